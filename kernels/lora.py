"""Multi-LoRA for a batch whose tokens use different adapters (gather by per-token slot, like BGMV).

`a` [num_slots, rank, in_features] and `b` [num_slots, out_features, rank] hold one adapter per
slot (scale already folded into b); `slots` [T] gives each token's slot, -1 for none.
"""

from __future__ import annotations

import torch


def add_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    active_slots: list[int] | None = None,
) -> torch.Tensor:
    """y += (x @ a[slot].T) @ b[slot].T for each token with a slot; returns y (modified in place).
    `active_slots` (the distinct slots, known on the host) saves a device sync."""
    for slot in active_slots if active_slots is not None else torch.unique(slots).tolist():
        if slot < 0:
            continue
        rows = (slots == slot).nonzero(as_tuple=True)[0]
        shrunk = x[rows].to(a.dtype) @ a[slot].T
        y[rows] += (shrunk @ b[slot].T).to(y.dtype)
    return y


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    active_slots: list[int] | None = None,
) -> torch.Tensor:
    return add_lora_ref(y, x, a, b, slots, active_slots)
