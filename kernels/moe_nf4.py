"""Mixture-of-experts experts kept in NF4, one bitsandbytes 4-bit linear per expert (Unsloth's
`-bnb-4bit` MoE layout), stacked so that one kernel launch reads every expert's weight (the format,
GroupedNF4, is sloth_kernels.moe_nf4_format's; the bytes are the experts' own, unchanged): `moe_experts_nf4`
runs the grouped Triton GEMMs of `sloth_kernels.triton_moe_nf4` on CUDA (no host sync) and, elsewhere, the
reference: each expert's weight dequantized exactly as bitsandbytes does, through
`sloth_kernels.moe.moe_experts_ref`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe import moe_experts_lora_ref, moe_experts_ref, silu_and_mul
from .moe_lora import MoELoRA, interpreting
from .moe_nf4_format import GroupedNF4
from .nf4 import dequantize_nf4_ref


def moe_experts_nf4_ref(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: GroupedNF4,
                        up: GroupedNF4, down: GroupedNF4, lora: MoELoRA | None = None) -> torch.Tensor:
    """Expert by expert (host-synchronizing): down(silu(gate x) * up x), each weight dequantized to
    bitsandbytes' values in x's dtype; with `lora`, each token's expert LoRA added to both projections."""
    def project(e: int, proj: str, rows: torch.Tensor) -> torch.Tensor:
        parts = (down,) if proj == "down" else (gate, up)
        return torch.cat([F.linear(rows, dequantize_nf4_ref(p.expert(e)).to(rows.dtype)) for p in parts], -1)

    if lora is not None:
        return moe_experts_lora_ref(x, ids, weights, gate.num_experts, project, silu_and_mul, lora)
    return moe_experts_ref(x, ids, weights, gate.num_experts,
                           lambda e, rows: project(e, "down", silu_and_mul(project(e, "gate_up", rows))))


def moe_experts_nf4(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: GroupedNF4,
                    up: GroupedNF4, down: GroupedNF4, lora: MoELoRA | None = None) -> torch.Tensor:
    """The experts' weighted sum per token (with `lora`: each token's expert LoRA added to both
    projections, gate|up as [gate columns, up columns]): two grouped Triton launches on CUDA (and
    with LoRA under TRITON_INTERPRET=1), the reference elsewhere."""
    if x.shape[0] > 0 and (x.is_cuda or (lora is not None and interpreting())):
        from .triton_moe_nf4 import fused_moe_nf4, supports

        if supports(x, gate, up, down):
            return fused_moe_nf4(x, ids, weights, gate, up, down, lora=lora)
    return moe_experts_nf4_ref(x, ids, weights, gate, up, down, lora)
