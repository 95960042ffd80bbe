"""Hot-swapped LoRA on MoE experts: each adapter slot's update of an experts module (A [E, R, in],
B [E, out, R] per projection, server/loader/expert_adapter.py) on the device, and the experts' forward
with it, expert by expert: a token's gate|up and down outputs gain B[e] A[e] of their input for the
adapter its slot holds. Host-synchronizing (it loops over the experts in use), so steps with such an
adapter run eagerly, outside CUDA graphs; steps without one keep the grouped kernels. (--merge-lora
adds an update into the weights instead: server/loader/expert_adapter.py.)"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sloth_kernels.moe import expert_groups

from .layers import StepMetadata

# (expert, projection "gate_up" / "down", rows) -> the base projection of those rows
Project = Callable[[int, str, torch.Tensor], torch.Tensor]
Update = dict[str, tuple[torch.Tensor, torch.Tensor]]


class ExpertLoRASlots:
    """The updates the adapter slots hold for one experts module (slots without one: absent)."""

    def __init__(self) -> None:
        self.by_slot: dict[int, Update] = {}

    def write(self, slot: int, update: Update | None, dtype: torch.dtype, device: torch.device) -> None:
        """Put an adapter's update in a slot (None: the adapter has none here, the slot is emptied)."""
        self.by_slot.pop(slot, None)
        if update:
            self.by_slot[slot] = {
                p: (a.to(device, dtype), b.to(device, dtype)) for p, (a, b) in update.items()
            }

    def active(self, meta: StepMetadata | None) -> list[int]:
        """The step's slots that hold an update here (empty: the experts run as without adapters)."""
        if meta is None or meta.lora_slots is None or not meta.active_lora_slots:
            return []
        return [s for s in meta.active_lora_slots if s in self.by_slot]

    def delta(
        self, proj: str, e: int, rows: torch.Tensor, row_slots: torch.Tensor, slots: list[int]
    ) -> torch.Tensor:
        """sum over the active slots of [row's slot is s] * B_s[e] A_s[e] row (exact zeros elsewhere)."""
        out = torch.zeros(rows.shape[0], 0, dtype=rows.dtype, device=rows.device)
        for s in slots:
            update = self.by_slot[s].get(proj)
            if update is None:
                continue
            a, b = update
            y = (rows @ a[e].t()) @ b[e].t()
            y = y * (row_slots == s).unsqueeze(1).to(y.dtype)
            out = y if out.shape[1] == 0 else out + y
        return out


def moe_experts_lora(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    project: Project,
    activate: Callable[[torch.Tensor], torch.Tensor],
    lora: ExpertLoRASlots,
    meta: StepMetadata,
    slots: list[int],
) -> torch.Tensor:
    """sloth_kernels.moe.moe_experts_ref's weighted sum, each expert's projections with its LoRA added
    for the tokens of adapters that have one (tokens of other adapters and of none: the base)."""
    assert meta.lora_slots is not None
    token_slots = meta.lora_slots
    out = torch.zeros_like(x)
    for e, k, token in expert_groups(ids, num_experts):
        rows, row_slots = x[token], token_slots[token]
        h = _with_delta(project(e, "gate_up", rows), lora.delta("gate_up", e, rows, row_slots, slots))
        h = activate(h)
        y = _with_delta(project(e, "down", h), lora.delta("down", e, h, row_slots, slots))
        out.index_add_(0, token, (y * weights[token, k, None]).to(out.dtype))
    return out


def _with_delta(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return y if delta.shape[1] == 0 else y + delta
