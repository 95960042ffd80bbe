"""An NF4 projection with each row's LoRA added: the reference (the NF4 product, then
sloth_kernels.lora's gather by slot), and the dispatch that runs the one-launch Triton kernel of
sloth_kernels.triton_nf4_lora on decode-sized batches, the two apart otherwise. `a`, `b`, `slots`,
`slices` and `ranks` are add_lora's."""

from __future__ import annotations

import os

import torch

from .lora import add_lora, add_lora_ref
from .nf4 import nf4_linear, nf4_linear_ref
from .nf4_format import NF4Weight


def nf4_linear_lora_ref(
    x: torch.Tensor, w: NF4Weight, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
    slices: list[int] | None = None, active_slots: list[int] | None = None,
) -> torch.Tensor:
    """x @ W.T with W dequantized as bitsandbytes does, then slice i's columns get (x @ A_i[slot].T) @
    B_i[slot].T for each row with a slot (the rounding of sloth_kernels.lora.add_lora_ref)."""
    y = nf4_linear_ref(x, w)
    slices = slices or [w.shape[0]]
    rank = a.shape[1] // len(slices)
    offset = 0
    for i, n in enumerate(slices):
        add_lora_ref(y[:, offset : offset + n], x, a[:, i * rank : (i + 1) * rank], b[:, offset : offset + n], slots,
                     active_slots)
        offset += n
    return y


def runs_triton(x: torch.Tensor) -> bool:
    """The Triton kernel runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (the CPU tests of the
    engine run it there, so that the path the flag turns on is the one they check)."""
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def nf4_linear_lora(
    x: torch.Tensor, w: NF4Weight, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
    slices: list[int] | None = None, ranks: torch.Tensor | None = None, active_slots: list[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, K] @ W.T plus each row's LoRA -> [T, N] (written into `out`, a 2-D view, when given). One
    launch of the fused kernel where it applies (a batch of up to 64 rows, shapes it takes, Triton
    here); elsewhere the NF4 product and add_lora apart, which `active_slots` spares a sync."""
    slices = slices or [w.shape[0]]
    if runs_triton(x):
        from .triton_nf4_lora import fusable, nf4_lora_matmul

        if fusable(x, w, a, slices):
            return nf4_lora_matmul(x, w, a, b, slots, slices, ranks, out)
    y = nf4_linear(x, w, out=out)
    return add_lora(y, x, a, b, slots, active_slots, slices, ranks)
