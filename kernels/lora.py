"""Multi-LoRA for a batch whose tokens use different adapters (gather by per-token slot, like BGMV).

`a` [num_slots, rank, in_features] and `b` [num_slots, out_features, rank] hold one adapter per
slot (scale already folded into b); `slots` [T] (int32) gives each token's slot, -1 for none.
`y` may be a column slice of a wider output (a fused projection's slice): only its strides count.
On CUDA `add_lora` runs the Triton shrink/expand kernels of `sloth_kernels.triton_lora` (ranks up to 64);
elsewhere, or for larger ranks, the reference. A fused projection's slices (q|k|v, gate|up) go at
once: their A and B stacked, two launches in all instead of two per slice. Neither reads the slots
on the host unless given the step's distinct slots, so both can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

MAX_TRITON_RANK = 64


def add_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    active_slots: list[int] | None = None,
) -> torch.Tensor:
    """y += (x @ a[slot].T) @ b[slot].T for each token with a slot; returns y (modified in place).
    With `active_slots` (the step's distinct slots, known on the host: eager steps) each slot's
    tokens are gathered, a device sync. Without it (a CUDA graph, which may not sync while captured)
    every slot's delta is computed over all tokens and kept where a token uses that slot: the same
    sums, num_slots times the work, and no host read of `slots`."""
    if active_slots is None:
        return _add_lora_masked(y, x, a, b, slots)
    for slot in active_slots:
        if slot < 0:
            continue
        rows = (slots == slot).nonzero(as_tuple=True)[0]
        shrunk = x[rows].to(a.dtype) @ a[slot].T
        y[rows] += (shrunk @ b[slot].T).to(y.dtype)
    return y


def _add_lora_masked(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     slots: torch.Tensor) -> torch.Tensor:
    xs = x.to(a.dtype)
    for slot in range(a.shape[0]):
        delta = ((xs @ a[slot].T) @ b[slot].T).to(y.dtype)
        y += torch.where((slots == slot).unsqueeze(1), delta, 0)
    return y


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    active_slots: list[int] | None = None,
    slices: list[int] | None = None,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """y += LoRA(x) per token's slot, in place; returns y. The Triton path needs no `active_slots`
    (programs of unused slots return at once) and never synchronizes with the host.

    `slices`, for a fused projection (q|k|v, gate|up): y's columns are that many wide each, `a`
    [num_slots, len(slices) * rank, K] stacks each slice's A along the rank and `b` [num_slots,
    sum(slices), rank] each slice's B along the output; slice i's columns get (x @ A_i.T) @ B_i.T,
    in one shrink and one expand launch where the slices stack (else slice by slice). `ranks`
    ([num_slots] int32): each slot's adapter rank where slots are wider, so that the Triton kernels
    skip the zero padding (the reference multiplies it: the result is the same)."""
    slices = slices or [y.shape[1]]
    rank = a.shape[1] // len(slices)
    if y.is_cuda and a.dtype in (torch.float16, torch.bfloat16, torch.float32):
        from .triton_lora import add_lora_triton, stackable

        if rank <= MAX_TRITON_RANK and stackable(slices, rank):
            if active_slots is not None and all(s < 0 for s in active_slots):
                return y
            return add_lora_triton(y, x, a, b, slots if slots.dtype == torch.int32 else slots.int(), slices=slices,
                                   ranks=ranks)
    if len(slices) == 1:
        return add_lora_ref(y, x, a, b, slots, active_slots)
    offset = 0
    for i, n in enumerate(slices):
        add_lora(y[:, offset : offset + n], x, a[:, i * rank : (i + 1) * rank], b[:, offset : offset + n], slots,
                 active_slots, ranks=ranks)
        offset += n
    return y
