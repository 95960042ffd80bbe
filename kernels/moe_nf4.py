"""Mixture-of-experts experts kept in NF4, one bitsandbytes 4-bit linear per expert (Unsloth's
`-bnb-4bit` MoE layout), stacked so that one kernel launch reads every expert's weight (the format,
GroupedNF4, is sloth_kernels.moe_nf4_format's; the bytes are the experts' own, unchanged): `moe_experts_nf4`
runs the grouped Triton GEMMs of `sloth_kernels.triton_moe_nf4` on CUDA (no host sync) and, elsewhere, the
reference: each expert's weight dequantized exactly as bitsandbytes does, through
`sloth_kernels.moe.moe_experts_ref`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe import moe_experts_ref
from .moe_nf4_format import GroupedNF4
from .nf4 import dequantize_nf4_ref


def moe_experts_nf4_ref(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: GroupedNF4,
                        up: GroupedNF4, down: GroupedNF4) -> torch.Tensor:
    """Expert by expert (host-synchronizing): down(silu(gate x) * up x), each weight dequantized to
    bitsandbytes' values in x's dtype."""
    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        g = F.linear(rows, dequantize_nf4_ref(gate.expert(e)).to(rows.dtype))
        u = F.linear(rows, dequantize_nf4_ref(up.expert(e)).to(rows.dtype))
        return F.linear(F.silu(g) * u, dequantize_nf4_ref(down.expert(e)).to(rows.dtype))

    return moe_experts_ref(x, ids, weights, gate.num_experts, expert)


def moe_experts_nf4(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: GroupedNF4,
                    up: GroupedNF4, down: GroupedNF4) -> torch.Tensor:
    """The experts' weighted sum per token: two grouped Triton launches on CUDA, the reference elsewhere."""
    if x.is_cuda and x.shape[0] > 0:
        from .triton_moe_nf4 import fused_moe_nf4, supports

        if supports(x, gate, up, down):
            return fused_moe_nf4(x, ids, weights, gate, up, down)
    return moe_experts_nf4_ref(x, ids, weights, gate, up, down)
