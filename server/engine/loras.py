"""An adapter folder read and checked against the engine's adapter slots, before the engine thread
adds it (reading the files takes long; only `LLMEngine.add_lora` runs between steps)."""

from __future__ import annotations

from pathlib import Path

from ..loader.peft import LoRAWeights, check_fits, load_lora
from .llm_engine import LLMEngine


def load_adapter(engine: LLMEngine, name: str, path: str | Path) -> LoRAWeights:
    """The adapter's weights, padded to the slots' rank; ValueError when they do not fit the model."""
    weights = load_lora(name, Path(path), engine.lora_manager.max_rank)
    manager = engine.lora_manager
    check_fits(weights, manager.layers, manager.experts, manager.vision)  # refused here, before the engine sees it
    return weights
