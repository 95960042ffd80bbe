"""Hot-swappable LoRA adapters: host copies of every registered adapter, and a fixed number of
device slots (written between steps) that the adapters of the current batch occupy, least recently
used evicted first."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..loader.peft import LoRAWeights, check_fits
from ..models.layers import LoRALinear
from ..models.moe import Experts

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(
        self, layers: dict[str, LoRALinear], max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device,
        experts: dict[str, Experts] | None = None, vision: Mapping[str, nn.Linear] | None = None,
    ) -> None:
        self.layers = layers
        # MoE experts modules: an adapter's LoRA on them goes into their own per-slot tables
        # (server/models/expert_lora.py), written with the slot
        self.experts = experts or {}
        # An image-text model's vision tower linears, which an adapter's vision LoRA trains (None: a
        # model whose tower takes none); applied when the tower encodes (sloth_serve.models.tower_lora)
        self.vision = vision
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.has_slots = False  # device slots are made with the first adapter: no cost without LoRA
        self.adapters: dict[int, LoRAWeights] = {}
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU order
        # Each slot's adapter rank (0: empty), read by the kernels: they read no further into a slot.
        # It saves little (H200, 8B, batch 64, rank-16 adapters in rank-64 slots: shrink 54 -> 47 µs
        # a call); slots as narrow as the adapters save more (step 10.7 -> 9.0 ms), hence the
        # default --max-lora-rank.
        self.slot_ranks: torch.Tensor | None = None

    @staticmethod
    def slot_bytes(layers: Iterable[LoRALinear], max_loras: int, max_rank: int, itemsize: int) -> int:
        """What the device slots take once the first adapter makes them (create_lora_slots): per layer
        and slot, each output slice's A [rank, in] and B [out, rank]. The KV cache is sized before
        any adapter arrives, so this is set aside then (MoE experts' tables apart: expert_table_bytes)."""
        per_slot = sum(max_rank * (layer.in_features * sum(1 for n in layer.out_slices if n) + sum(layer.out_slices))
                       for layer in layers)
        return max_loras * per_slot * itemsize

    @staticmethod
    def expert_table_bytes(experts: Iterable[Experts], max_loras: int, max_rank: int, itemsize: int) -> int:
        """What the MoE experts' LoRA tables take once an adapter of rank `max_rank` trains every
        experts module and projection (_reserve_expert_tables), the most they hold. Like the slots,
        they are made after the KV cache is sized (gpt-oss-20b, 4 rank-16 slots, bfloat16: 1.4 GB).
        Widening a module's tables holds its old ones too until the new ones are installed; that
        passing peak is not counted."""
        return sum(module.lora.full_bytes(max_loras, max_rank, itemsize) for module in experts)

    def add(self, adapter_id: int, weights: LoRAWeights) -> bool:
        """Register an adapter (its slot is written when a batch needs it). True where it made or
        widened MoE experts' LoRA tables: CUDA graphs captured before read the old ones."""
        # Checked here, not only at load: a slot write that fails mid-step would stop the engine for
        # every request, where a refusal now fails only this adapter's load.
        check_fits(weights, self.layers, self.experts, self.vision)
        for (module, _), (a, b) in weights.tensors.items():
            if not a.shape[0] == b.shape[1] <= self.max_rank:
                raise ValueError(f"adapter {weights.name!r}: {module} has rank {a.shape[0]} (A) / {b.shape[1]} (B); "
                                 f"the adapter slots hold rank {self.max_rank} (--max-lora-rank)")
        if not self.has_slots:
            self.slot_ranks = torch.zeros(self.max_loras, dtype=torch.int32, device=self.device)
            for layer in self.layers.values():
                layer.create_lora_slots(self.max_loras, self.max_rank, self.dtype, self.device, self.slot_ranks)
            self.has_slots = True
        tables_changed = self._reserve_expert_tables(weights)
        self.remove(adapter_id)
        self.adapters[adapter_id] = weights
        if weights.experts and self.needs_eager_experts([adapter_id]):
            logger.warning("adapter %s trains MoE experts that run one by one (4-bit experts without grouped "
                           "kernels): steps with its requests decode without CUDA graphs (correct, not fast); "
                           "merge it (--merge-lora) for speed", weights.name)
        return tables_changed

    def _reserve_expert_tables(self, weights: LoRAWeights) -> bool:
        """Make or widen the experts' LoRA tables this adapter needs; all are allocated before any is
        used, so running out of memory leaves the old ones (and the graphs that read them) as they were."""
        planned = {name: self.experts[name].lora.widened(update, self.max_loras, self.dtype, self.device)
                   for name, update in weights.experts.items()}
        planned = {name: tables for name, tables in planned.items() if tables}
        for name, tables in planned.items():
            self.experts[name].lora.install(tables)
        if planned:
            added = sum(t.a.numel() * t.a.element_size() + t.b.numel() * t.b.element_size()
                        for tables in planned.values() for t in tables.values())
            logger.info("MoE expert LoRA tables for adapter %s: %d modules, %.1f MiB (old ones freed)",
                        weights.name, len(planned), added / 2**20)
        return bool(planned)  # (widened tables keep what their slots held; new ones start empty, as they are)

    def needs_eager_experts(self, adapter_ids: Iterable[int]) -> bool:
        """Whether an adapter of these trains MoE experts that run one by one, reading the routing
        on the host (its steps run eagerly); grouped experts take expert LoRA inside CUDA graphs."""
        return any(not self.experts[name].runs_grouped
                   for a in adapter_ids if a in self.adapters for name in self.adapters[a].experts)

    def vision_lora(self, adapter_id: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """The adapter's LoRA on the vision tower (None for the base and for an adapter without one,
        whose images share the base's encoding)."""
        weights = self.adapters.get(adapter_id)
        return weights.vision if weights is not None and weights.vision else None

    def remove(self, adapter_id: int) -> None:
        self.adapters.pop(adapter_id, None)
        self.slot_of.pop(adapter_id, None)

    def assign_slots(self, adapter_ids: set[int]) -> dict[int, int]:
        """Make every adapter of the batch resident; returns adapter id -> slot."""
        wanted = adapter_ids - {0}
        if len(wanted) > self.max_loras:
            raise ValueError(f"{len(wanted)} adapters in one step but --max-loras is {self.max_loras}")
        for adapter_id in wanted:
            if adapter_id in self.slot_of:
                self.slot_of.move_to_end(adapter_id)
                continue
            used = set(self.slot_of.values())
            free = [s for s in range(self.max_loras) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(a for a in self.slot_of if a not in wanted)
                slot = self.slot_of.pop(victim)
            self._write_slot(slot, self.adapters[adapter_id])
            self.slot_of[adapter_id] = slot
        return {a: self.slot_of[a] for a in wanted}

    @torch.no_grad()
    def _write_slot(self, slot: int, weights: LoRAWeights) -> None:
        for layer in self.layers.values():
            for a, b in zip(layer.lora_a, layer.lora_b, strict=True):
                a[slot].zero_()
                b[slot].zero_()
        for (module, index), (a, b) in weights.tensors.items():
            layer = self.layers[module]
            r = a.shape[0]
            layer.lora_a[index][slot, :r].copy_(a)
            layer.lora_b[index][slot, :, :r].copy_(b)
        for name, experts in self.experts.items():
            experts.lora.write(slot, weights.experts.get(name))
        assert self.slot_ranks is not None
        self.slot_ranks[slot] = max((a.shape[0] for a, _ in weights.tensors.values()), default=0)
