"""LoRA on an image-text model's vision tower, per request: the tower runs once per image in the
prefill, in 16-bit, so each adapter's images go through it together with that adapter's deltas
(x @ A^T @ B^T, B already scaled) added to the outputs of the linears it trains. No slots and no
multi-LoRA kernel: the deltas are added by forward hooks for the length of one tower pass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def tower_linears(model: nn.Module, *roots: str) -> dict[str, nn.Linear]:
    """The linear layers under the model's vision submodules `roots`, by our names (what an adapter's
    vision LoRA may train)."""
    found: dict[str, nn.Linear] = {}
    for root in roots:
        module = getattr(model, root, None)
        if module is None:
            continue
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                found[f"{root}.{name}"] = sub
    return found


def vision_lora_layers(model: object) -> dict[str, nn.Linear] | None:
    """The model's vision linears that take LoRA per request (None: a model whose tower takes none)."""
    lister = getattr(model, "vision_lora_layers", None)
    return lister() if lister is not None else None  # type: ignore[no-any-return]


# One adapter's vision LoRA: our module name -> (A [r, in], B * scale [out, r])
TowerDeltas = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@contextmanager
def tower_lora(linears: Mapping[str, nn.Module], deltas: TowerDeltas | None) -> Iterator[None]:
    """Within the block, each linear the adapter trains returns W x + b + B (A x). Nothing changes
    for None or an empty adapter (the base tower)."""
    handles = []
    try:
        for name, (a, b) in (deltas or {}).items():
            handles.append(linears[name].register_forward_hook(_adds(a, b)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adds(a: torch.Tensor, b: torch.Tensor) -> Any:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return out + ((x.to(a.dtype) @ a.t()) @ b.t()).to(out.dtype)
    return hook
