"""Hot-swapped LoRA on MoE experts: every adapter slot's update of an experts module (A [E, R, in],
B [E, out, R] per projection, server/loader/expert_adapter.py) in device tables beside the dense
LoRA slots, and the step's view of them (sloth_kernels.moe_lora.MoELoRA) that the experts' grouped
kernels add per token (no host sync: CUDA graphs capture it); experts that run one by one add it
expert by expert (sloth_kernels.moe_lora.moe_experts_lora_ref). (--merge-lora adds an update into
the weights instead: server/loader/expert_adapter.py.)"""

from __future__ import annotations

import torch

from sloth_kernels.moe_lora import ExpertLoRA, MoELoRA

from .layers import StepMetadata

Update = dict[str, tuple[torch.Tensor, torch.Tensor]]


class ExpertLoRASlots:
    """One experts module's LoRA tables: per projection ("gate_up", "down") A [slots, E, R, in] and
    B [slots, E, out, R] (zeros past each slot's rank) and each slot's rank there (0: none). Made
    with the first adapter that trains this module (no cost before), widened when a later one has
    a larger rank (LoRAManager: the CUDA graphs are then captured again, reading the new ones)."""

    def __init__(self, num_experts: int, shapes: dict[str, tuple[int, int]]) -> None:
        self.num_experts = num_experts
        self.shapes = shapes  # projection -> (in, out)
        self.tables: dict[str, ExpertLoRA] = {}
        self.slot_ranks: dict[str, list[int]] = {}  # the tables' ranks, on the host

    def full_bytes(self, num_slots: int, rank: int, itemsize: int) -> int:
        """What this module's tables take with every projection at `rank` (the adapter slots' rank):
        A and B of `itemsize` bytes an element, and each projection's int32 slot ranks. Set aside
        before the KV cache is sized, since the tables are made with the first adapter that trains
        these experts (LoRAManager.expert_table_bytes)."""
        return sum(num_slots * (self.num_experts * rank * (dim_in + dim_out) * itemsize + 4)
                   for dim_in, dim_out in self.shapes.values())

    def widened(self, update: Update, num_slots: int, dtype: torch.dtype,
                device: torch.device) -> dict[str, ExpertLoRA]:
        """New tables for the projections of `update` that have none as wide as its rank, holding
        what the old ones hold (not yet in use: `install` them, once every module's are made)."""
        new: dict[str, ExpertLoRA] = {}
        for proj, (a, _) in update.items():
            rank = a.shape[1]
            old = self.tables.get(proj)
            if old is not None and old.a.shape[2] >= rank:
                continue
            dim_in, dim_out = self.shapes[proj]
            table = ExpertLoRA(torch.zeros(num_slots, self.num_experts, rank, dim_in, dtype=dtype, device=device),
                               torch.zeros(num_slots, self.num_experts, dim_out, rank, dtype=dtype, device=device),
                               torch.zeros(num_slots, dtype=torch.int32, device=device))
            if old is not None:
                r = old.a.shape[2]
                table.a[:, :, :r].copy_(old.a)
                table.b[..., :r].copy_(old.b)
                table.ranks.copy_(old.ranks)
            new[proj] = table
        return new

    def install(self, tables: dict[str, ExpertLoRA]) -> None:
        for proj, table in tables.items():
            self.tables[proj] = table
            self.slot_ranks.setdefault(proj, [0] * table.ranks.shape[0])

    @torch.no_grad()
    def write(self, slot: int, update: Update | None) -> None:
        """Put an adapter's update in a slot (None, or a projection it lacks: that slot has none there)."""
        for proj, table in self.tables.items():
            pair = (update or {}).get(proj)
            rank = 0 if pair is None else pair[0].shape[1]
            table.a[slot].zero_()
            table.b[slot].zero_()
            if pair is not None:
                table.a[slot, :, :rank].copy_(pair[0])
                table.b[slot, ..., :rank].copy_(pair[1])
            table.ranks[slot] = rank
            self.slot_ranks[proj][slot] = rank

    def step(self, meta: StepMetadata | None) -> MoELoRA | None:
        """The step's LoRA on these experts, or None where it has none: no tables, no adapter slots,
        or (known on the host in eager steps) no slot of the step with an update here. A captured
        step (slots on the device only) always takes the tables: slots without an update skip."""
        if not self.tables or meta is None or meta.lora_slots is None:
            return None
        active = meta.active_lora_slots
        if active is not None and not any(ranks[s] for ranks in self.slot_ranks.values() for s in active if s >= 0):
            return None
        return MoELoRA(meta.lora_slots, self.tables.get("gate_up"), self.tables.get("down"))
