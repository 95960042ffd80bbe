"""Runtime: what a request needs once the model is loaded (the engine client, tokenizers, adapters,
grammar compiler, image processor). Below the server's state (server/api/state.py makes one when
loading ends), so that what reads the loaded model (limits, the routes) need not import the state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import Adapter, AdapterRegistry, file_signature
from ..engine.client import AdapterNamed, AdapterUnnamed, EngineClient, EngineInfo
from ..engine.grammar import GrammarCompiler
from ..vision_processor import VisionProcessor
from .logprobs import TokenTexts
from .tokenizers import TokenizerRegistry


@dataclass(slots=True)
class Runtime:
    """Everything a request needs once the model is loaded."""

    engine: EngineClient
    info: EngineInfo
    tokenizer: Any
    adapters: AdapterRegistry
    token_texts: TokenTexts
    base_model_id: str
    tokenizers: TokenizerRegistry  # per model: the tokenizer, chat template and EOS ids its requests use
    grammar: GrammarCompiler | None = None  # compiles structured-output specs here (a bad one is a 400)
    grammar_error: str | None = None  # why there is none (a tokenizer the grammar engine cannot read)
    vision: VisionProcessor | None = None  # image-text models: images in chat messages become engine inputs
    reasoning_parser: str = "auto"  # --reasoning-parser / --tool-call-parser (server/api/output_reader.py)
    tool_call_parser: str = "auto"

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    async def load_adapter(self, name: str, path: str, pinned: bool, at_startup: bool = False) -> Adapter:
        """Read the adapter into the engine, then make its name servable (evicting beyond
        --max-cpu-loras); returns the adapter that serves the name. ValueError when it cannot be
        loaded. A pinned one (--lora, `at_startup`, or /v1/load_lora_adapter) is served under its
        name by every front end."""
        adapter = self.adapters.prepare(name, path, pinned, at_startup)
        # Its own tokenizer / chat template / EOS when its folder holds them (else the base's).
        tokenizer = await asyncio.to_thread(self.tokenizers.prepare, path, name)
        adapter.rank = await self.engine.add_lora(adapter.adapter_id, name, path, shared=pinned)
        return await self._serve(adapter, tokenizer, own=True)

    async def unload_adapter(self, name: str) -> None:
        adapter = self.adapters.unregister(name)
        await self.engine.remove_lora(adapter.adapter_id)

    async def adopt_adapter(self, news: AdapterNamed) -> None:
        """Serve what another front end loaded (its weights are in the engine already)."""
        tokenizer = await asyncio.to_thread(self.tokenizers.prepare, news.path, news.name)
        await self._serve(Adapter(news.name, news.path, news.adapter_id, news.rank, pinned=True,
                                  signature=file_signature(Path(news.path))), tokenizer, own=False)

    def forget_adapter(self, news: AdapterUnnamed) -> None:
        """Another front end unloaded it (the engine drops its weights)."""
        held = self.adapters.by_name.get(news.name)
        if held is not None and held.adapter_id == news.adapter_id:
            self.adapters.unregister(news.name)

    async def _serve(self, adapter: Adapter, tokenizer: Any, own: bool) -> Adapter:
        """Serve `adapter` under its name (`own`: loaded by this front end, else another's); returns
        the adapter that serves the name. A shared adapter under the name (several front ends) stays:
        this front end's load of the name on a request, finishing after another front end's load was
        adopted, is dropped, and news of a shared adapter since replaced here is stale."""
        registry = self.adapters
        held = registry.by_name.get(adapter.name)
        if (held is not None and held.pinned and held.adapter_id != adapter.adapter_id
                and not (own and adapter.pinned)):
            if own:
                await self.engine.remove_lora(adapter.adapter_id)
            return held
        self.tokenizers.put(adapter.adapter_id, tokenizer)  # before its id is servable
        old = registry.commit(adapter)
        # The one it replaced (a --lora adapter named by another front end first is the same one).
        dropped = [old] if old is not None and old.adapter_id != adapter.adapter_id else []
        dropped += [registry.unregister(v.name) for v in registry.evictable() if v.name != adapter.name]
        for gone in dropped:
            await self.engine.remove_lora(gone.adapter_id)
        return adapter
