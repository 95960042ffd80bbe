"""LoRA on the experts of a mixture of experts for a batch whose tokens use different adapters: each
(token, expert) assignment's projection gains B[s, e] A[s, e] of its input, s the token's adapter
slot (-1: none), e the expert. `moe_lora_delta_ref` (every assignment at once) and
`moe_experts_lora_ref` (the experts one by one, as `moe.moe_experts_ref`) are the PyTorch
references; the Triton version (triton_moe_lora) runs beside the grouped MoE GEMMs, over the same
sort of the assignments by expert, with no host sync (the `lora` argument of `moe.moe_experts`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .moe import expert_groups

# (expert, projection "gate_up" / "down", rows) -> the expert's projection of those rows, without LoRA
Project = Callable[[int, str, torch.Tensor], torch.Tensor]


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


def moe_experts_lora_ref(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                         project: Project, activate: Callable[[torch.Tensor], torch.Tensor],
                         lora: MoELoRA) -> torch.Tensor:
    """moe.moe_experts_ref's weighted sum with each expert's projections plus their LoRA delta for
    the tokens whose slot has one (rounded once more, where the projection's output is rounded).
    Host-synchronizing (it loops over the experts in use)."""
    out = torch.zeros_like(x)
    for e, k, token in expert_groups(ids, num_experts):
        rows, row_slots = x[token], lora.slots[token]
        h = activate(_with_delta(project(e, "gate_up", rows), rows, e, row_slots, lora.gate_up))
        y = _with_delta(project(e, "down", h), h, e, row_slots, lora.down)
        out.index_add_(0, token, (y * weights[token, k, None]).to(out.dtype))
    return out


def _with_delta(y: torch.Tensor, rows: torch.Tensor, e: int, row_slots: torch.Tensor,
                lora: ExpertLoRA | None) -> torch.Tensor:
    if lora is None:
        return y
    experts = torch.full_like(row_slots, e)
    return y + moe_lora_delta_ref(rows, experts, row_slots, lora).to(y.dtype)
