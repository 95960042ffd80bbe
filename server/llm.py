"""Offline generation: `LLM(model_path).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from server.adapters import AdapterRegistry
from server.config import Config
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason, TokenLogprob
from server.loader import DEMO_MODEL


@dataclass(slots=True)
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str | Path = DEMO_MODEL, lora: dict[str, str] | None = None, **settings: Any) -> None:
        config = Config(model=str(model), **settings)
        if lora:
            config = replace(config, lora_modules=tuple(lora.items()))
        self.engine = LLMEngine(config)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.engine.loaded.folder))
        self.engine.runner.sampler.set_tokenizer(
            self.tokenizer, self.engine.loaded.model.config.vocab_size, self.engine.eos_token_ids
        )
        self.adapters = AdapterRegistry(self.engine)
        for name, path in config.lora_modules:
            self.adapters.register(name, path)
        self._ids = itertools.count()

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return list(prompt)

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        adapter: str | list[str | None] | None = None,
    ) -> list[GenerationOutput]:
        """Run every prompt to completion in one continuous batch; outputs in prompt order."""
        batch: list = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else list(prompts)
        n = len(batch)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * n
        adapter_list = adapter if isinstance(adapter, list) else [adapter] * n
        results: dict[str, GenerationOutput] = {}
        order: list[str] = []
        for prompt, p, name in zip(batch, params_list, adapter_list, strict=True):
            request_id = f"offline-{next(self._ids)}"
            token_ids = self.encode(prompt)
            self.engine.add_request(request_id, token_ids, p, self.adapter_id(name))
            results[request_id] = GenerationOutput(token_ids)
            order.append(request_id)
        while self.engine.has_unfinished_requests:
            for out in self.engine.step():
                res = results.get(out.request_id)
                if res is None:
                    continue
                res.token_ids.extend(out.new_token_ids)
                res.logprobs.extend(out.new_logprobs)
                if out.finished:
                    res.finish_reason = out.finish_reason
                    res.num_cached_tokens = out.num_cached_tokens
        for res in results.values():
            res.text = str(self.tokenizer.decode(res.token_ids, skip_special_tokens=True))
        return [results[r] for r in order]

    def adapter_id(self, name: str | None) -> int:
        if name is None:
            return 0
        adapter = self.adapters.get(name)
        if adapter is None:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {sorted(self.adapters.by_name)}")
        return adapter.adapter_id
