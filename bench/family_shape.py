"""One model family's shape for the random-weight benchmarks: the config.json fields a checkpoint of
it has. The record alone, so the tables of shapes (bench/family_shapes.py, bench/hybrid_shapes.py)
both stand on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class FamilyShape:
    model_type: str  # transformers' model_type (picks the config class)
    architecture: str  # config.json's architectures[0]
    fields: dict[str, Any]  # config.json fields beyond transformers' defaults
    source: str  # the checkpoint whose shape this is
    # What the NF4 folder keeps in 16-bit besides embeddings and norms (transformers' bnb skips lm_head).
    skip_modules: tuple[str, ...] = ("lm_head",)
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> int:
        return int(self.fields["num_hidden_layers"])

    @property
    def vocab(self) -> int:
        return int(self.fields["vocab_size"])
