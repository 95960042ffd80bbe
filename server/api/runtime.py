"""Runtime: what a request needs once the model is loaded (the engine client, tokenizers, adapters,
grammar compiler, image processor). Below the server's state (server/api/state.py makes one when
loading ends), so that what reads the loaded model (limits, the routes) need not import the state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..adapters import Adapter, AdapterRegistry
from ..engine.client import EngineClient, EngineInfo
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

    async def load_adapter(self, name: str, path: str, pinned: bool) -> Adapter:
        """Read the adapter into the engine, then make its name servable (evicting beyond
        --max-cpu-loras). ValueError when it cannot be loaded."""
        registry = self.adapters
        adapter = registry.prepare(name, path, pinned)
        # Its own tokenizer / chat template / EOS when its folder holds them (else the base's).
        tokenizer = await asyncio.to_thread(self.tokenizers.prepare, path, name)
        adapter.rank = await self.engine.add_lora(adapter.adapter_id, name, path)
        self.tokenizers.put(adapter.adapter_id, tokenizer)  # before its id is servable
        dropped = [old] if (old := registry.commit(adapter)) is not None else []
        dropped += [registry.unregister(v.name) for v in registry.evictable() if v.name != name]
        for gone in dropped:
            await self.engine.remove_lora(gone.adapter_id)
        return adapter

    async def unload_adapter(self, name: str) -> None:
        adapter = self.adapters.unregister(name)
        await self.engine.remove_lora(adapter.adapter_id)
