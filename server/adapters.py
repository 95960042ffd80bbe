"""Names of LoRA adapters as clients use them (`model: NAME`), mapped to engine adapter ids."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from server.engine.llm_engine import LLMEngine
from server.loader.peft import load_lora


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    path: str
    adapter_id: int
    rank: int


class AdapterRegistry:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.by_name: dict[str, Adapter] = {}
        self._ids = itertools.count(1)

    def register(self, name: str, path: str | Path) -> Adapter:
        if not name or ("/" in name and Path(name).is_absolute()):
            raise ValueError(f"invalid adapter name {name!r}")
        if name in self.by_name:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        weights = load_lora(name, path, self.engine.config.max_lora_rank)
        adapter = Adapter(name, str(path), next(self._ids), weights.rank)
        self.engine.add_lora(adapter.adapter_id, weights)
        self.by_name[name] = adapter
        return adapter

    def unregister(self, name: str) -> Adapter:
        adapter = self.by_name.pop(name)
        self.engine.remove_lora(adapter.adapter_id)
        return adapter

    def get(self, name: str) -> Adapter | None:
        return self.by_name.get(name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.by_name.values()))
