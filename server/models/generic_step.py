"""The generic path's per-step context: what one forward pass's attention calls and linears read.
Its own small module, so the linears (generic_linear.py) and the model (generic.py) that both read
it stand above it rather than on each other."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layers import StepMetadata


@dataclass(slots=True)
class GenericStep:
    """What one forward pass's attention calls and linears read (nano-vllm's "context"): set by
    GenericCausalLM.forward, passed to attention as a keyword transformers forwards to it."""

    meta: StepMetadata | None = None
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    layers_called: list[int] = field(default_factory=list)
    # At load, before the KV cache exists: each layer's (kv heads, key dim, value dim), nothing computed.
    shapes: dict[int, tuple[int, int, int]] | None = None
    # With the shapes: each layer's sliding window as its attention call passes it (None: none passed).
    windows: dict[int, int | None] = field(default_factory=dict)
