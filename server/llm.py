"""Offline generation: `LLM(model_path).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from .adapters import Adapter, AdapterRegistry
from .api.tokenizers import TokenizerRegistry, base_entry
from .config import Config
from .engine.llm_engine import LLMEngine
from .engine.loras import load_adapter
from .engine.mm_inputs import MultiModalInputs
from .engine.sampling_params import SamplingParams
from .engine.sequence import FinishReason, TokenLogprob
from .loader import DEMO_MODEL
from .vision_families import processor_for
from .vision_processor import image_limits, open_image


class ImagePrompt(TypedDict):
    """A prompt with images (image-text models): text or token ids holding one image placeholder
    (Qwen2.5-VL: <|image_pad|>; Gemma 3: <start_of_image>) per image, in order; images as PIL images
    or encoded bytes."""

    prompt: NotRequired[str]
    prompt_token_ids: NotRequired[list[int]]
    images: NotRequired[list[Any]]
    multi_modal_data: NotRequired[dict[str, Any]]  # vLLM's form: {"image": one image or a list}


Prompt = str | list[int] | ImagePrompt
_PROMPT_KEYS = frozenset(ImagePrompt.__annotations__)


@dataclass(slots=True)
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: each prompt token's after the first (vLLM puts None first).
    prompt_logprobs: list[TokenLogprob] | None = None


class LocalAdapters(AdapterRegistry):
    """Adapters of an engine in this thread: loaded and added at once."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine

    def register(self, name: str, path: str | Path, pinned: bool = True) -> Adapter:
        if name in self.by_name:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        adapter = self.prepare(name, path, pinned)
        weights = load_adapter(self.engine, name, path)
        self.engine.add_lora(adapter.adapter_id, weights)
        adapter.rank = weights.rank
        self.commit(adapter)
        return adapter


class LLM:
    def __init__(self, model: str | Path = DEMO_MODEL, lora: dict[str, str] | None = None, **settings: Any) -> None:
        config = Config(model=str(model), **settings)
        if lora:
            config = replace(config, lora_modules=tuple(lora.items()))
        self.engine = LLMEngine(config)
        loaded = self.engine.loaded
        base = base_entry(loaded.folder, self.engine.eos_token_ids, loaded.adapter_folder, config.chat_template)
        self.tokenizer = base.tokenizer
        self.engine.runner.sampler.set_tokenizer(
            self.tokenizer, self.engine.loaded.model.config.vocab_size, self.engine.eos_token_ids
        )
        self.adapters = LocalAdapters(self.engine)
        # Each adapter's own tokenizer, chat template and EOS where its folder holds them (as served).
        self.tokenizers = TokenizerRegistry(base, self.adapters)
        for name, path in config.lora_modules:
            adapter = self.adapters.register(name, path)
            self.tokenizers.put(adapter.adapter_id, self.tokenizers.prepare(path, name))
        self._ids = itertools.count()
        self.vision = processor_for(loaded.folder, image_limits(config))

    def tokenizer_of(self, adapter: str | None = None) -> Any:
        """The tokenizer (and chat template) of the base model, or of an adapter that has its own."""
        return self.tokenizers.of(self.adapter_id(adapter)).tokenizer

    def encode(self, prompt: str | list[int], adapter: str | None = None) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer_of(adapter).encode(prompt, add_special_tokens=True))
        return list(prompt)

    def encode_prompt(self, prompt: Prompt, adapter: str | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """Token ids and, for an ImagePrompt, the images' engine inputs (its placeholders expanded)."""
        if not isinstance(prompt, dict):
            return self.encode(prompt, adapter), None
        unknown = sorted(set(prompt) - _PROMPT_KEYS)
        if unknown:
            raise ValueError(f"a prompt dict takes {', '.join(sorted(_PROMPT_KEYS))}; not {', '.join(unknown)}")
        text = prompt.get("prompt")
        ids = self.encode(text if text is not None else prompt.get("prompt_token_ids", []), adapter)
        images = list(prompt.get("images") or [])
        data = dict(prompt.get("multi_modal_data") or {})
        image = data.pop("image", None)
        if data:
            raise ValueError(f"multi_modal_data takes images only ('image'); not {', '.join(sorted(data))}")
        if image is not None:
            images += image if isinstance(image, list | tuple) else [image]
        if not images:
            return ids, None
        if self.vision is None:
            raise ValueError("this model takes text only; images need an image-text model (such as Qwen2.5-VL or Gemma 3)")
        return self.vision.expand(ids, [open_image(image, self.vision.limits, f"images[{i}]")
                                        for i, image in enumerate(images)])

    def generate(
        self,
        prompts: Prompt | list[str] | list[list[int]] | list[ImagePrompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        adapter: str | list[str | None] | None = None,
    ) -> list[GenerationOutput]:
        """Run every prompt to completion in one continuous batch; outputs in prompt order."""
        one = not isinstance(prompts, list | tuple) or bool(prompts and isinstance(prompts[0], int))
        batch: list[Any] = [prompts] if one else list(prompts)  # type: ignore[arg-type]
        n = len(batch)
        params_list = list(params) if isinstance(params, list | tuple) else [params or SamplingParams()] * n
        adapter_list = list(adapter) if isinstance(adapter, list | tuple) else [adapter] * n
        for what, given in (("params", params_list), ("adapter", adapter_list)):
            if len(given) != n:
                raise ValueError(f"{len(given)} {what} for {n} prompts: give one per prompt, or one for all")
        # Every prompt read (and refused) before any is queued: an error leaves nothing behind.
        encoded = [(self.adapter_id(name), *self.encode_prompt(prompt, name))
                   for prompt, name in zip(batch, adapter_list, strict=True)]
        results: dict[str, GenerationOutput] = {}
        tokenizers: dict[str, Any] = {}  # each request's model's, to decode its text
        order: list[str] = []
        try:
            for (adapter_id, token_ids, mm), p in zip(encoded, params_list, strict=True):
                request_id = f"offline-{next(self._ids)}"
                model = self.tokenizers.of(adapter_id)
                self.engine.add_request(request_id, token_ids, p, adapter_id, model.eos_token_ids, mm)
                results[request_id] = GenerationOutput(token_ids)
                tokenizers[request_id] = model.tokenizer
                order.append(request_id)
        except BaseException:  # one the engine refused (too long for the context...): none run
            for request_id in order:
                self.engine.abort(request_id)
            raise
        while self.engine.has_unfinished_requests:
            for out in self.engine.step():
                res = results.get(out.request_id)
                if res is None:
                    continue
                res.token_ids.extend(out.new_token_ids)
                res.logprobs.extend(out.new_logprobs)
                if out.prompt_logprobs is not None:
                    res.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    res.finish_reason = out.finish_reason
                    res.num_cached_tokens = out.num_cached_tokens
        for request_id, res in results.items():
            # The EOS or stop token that ended it is not in the text (as the server's, and vLLM's).
            texted = res.token_ids[:-1] if res.finish_reason is FinishReason.STOP else res.token_ids
            res.text = str(tokenizers[request_id].decode(texted, skip_special_tokens=True))
        return [results[r] for r in order]

    def adapter_id(self, name: str | None) -> int:
        if name is None:
            return 0
        adapter = self.adapters.get(name)
        if adapter is None:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {sorted(self.adapters.by_name)}")
        return adapter.adapter_id
