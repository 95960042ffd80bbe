"""LoRA on the experts of a mixture of experts for a batch whose tokens use different adapters: each
(token, expert) assignment's projection gains B[s, e] A[s, e] of its input, s the token's adapter
slot (-1: none), e the expert. `moe_lora_delta_ref` (every assignment at once) and
`moe.moe_experts_lora_ref` (the experts one by one, as `moe.moe_experts_ref`) are the PyTorch
references; the Triton version (triton_moe_lora) runs beside the grouped MoE GEMMs, over the same
sort of the assignments by expert, with no host sync (the `lora` argument of `moe.moe_experts`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ExpertLoRA:
    """Every adapter slot's LoRA on one projection of every expert (zeros past a slot's rank)."""

    a: torch.Tensor  # [slots, experts, rank, in]
    b: torch.Tensor  # [slots, experts, out, rank], the adapter's scale folded in
    ranks: torch.Tensor  # [slots] int32: the slot's adapter rank here, 0 where it has none (skipped)


@dataclass(frozen=True, slots=True)
class MoELoRA:
    """One step's LoRA on an experts module: each token's slot and the two projections' tables."""

    slots: torch.Tensor  # [T] int32, -1 for tokens without an adapter
    gate_up: ExpertLoRA | None
    down: ExpertLoRA | None

    def get(self, proj: str) -> ExpertLoRA | None:
        return self.gate_up if proj == "gate_up" else self.down


def interpreting() -> bool:
    """Whether Triton runs kernels on CPU tensors in this process (TRITON_INTERPRET=1: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def moe_lora_delta_ref(inputs: torch.Tensor, experts: torch.Tensor, slots: torch.Tensor,
                       lora: ExpertLoRA) -> torch.Tensor:
    """delta[i] = B[s_i, e_i] A[s_i, e_i] inputs[i] for each row i (zeros where s_i < 0): the shrink
    accumulated in float32 and rounded to the adapter's dtype, the expand in float32 rounded to the
    inputs' dtype (as the Triton kernels round). Gathers every row's A and B: a reference, not fast."""
    s = slots.long().clamp(min=0)
    e = experts.long()
    a, b = lora.a[s, e].float(), lora.b[s, e].float()  # [n, R, in], [n, out, R]
    shrunk = torch.einsum("nk,nrk->nr", inputs.float(), a).to(lora.a.dtype).float()
    delta = torch.einsum("nr,nor->no", shrunk, b)
    return (delta * (slots >= 0).unsqueeze(1)).to(inputs.dtype)
