"""The device copies of the whole modules (embed_tokens, lm_head, norms) of adapters resident in LoRA
slots, and each step's AdapterStep: which rows of the batch use them.

They live beside the LoRA slots rather than in fixed [max_loras, vocab, hidden] tables: such a table
would cost every slot an embedding and an lm_head (2 GiB each on an 8B model) whether or not its
adapter has them. A copy is made when its adapter first runs in a slot and dropped when the adapter
leaves the slots; steps that hold no such adapter never look at them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..loader.adapter_modules import check_adapter_modules, materialize
from ..models.per_adapter import AdapterGroup, AdapterStep, SlotModules
from .device import to_device

if TYPE_CHECKING:
    from ..loader.peft import LoRAWeights
    from ..models.weights import CausalLM
    from .lora_manager import LoRAManager


class SlotModuleTable:
    def __init__(self, model: CausalLM, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.dtype = dtype
        self.device = device
        self.resident: dict[int, tuple[LoRAWeights, SlotModules]] = {}  # adapter id -> its copy

    def check(self, weights: LoRAWeights) -> None:
        """Raise (before the adapter is registered) if its modules do not fit the model."""
        if weights.modules is not None:
            check_adapter_modules(weights.name, weights.modules, self.model)

    def vocab_size(self, weights: LoRAWeights | None) -> int:
        """Token ids an adapter's requests may hold: more than the base's when it added tokens."""
        base = self.model.config.vocab_size
        if weights is None or weights.modules is None:
            return base
        return weights.modules.resolved(self.model.config.tie_word_embeddings).vocab_size(base)

    @staticmethod
    def has_modules(lora: LoRAManager | None, adapter_ids: set[int]) -> bool:
        if lora is None:
            return False
        return any((w := lora.adapters.get(a)) is not None and w.modules is not None for a in adapter_ids)

    def sync(self, lora: LoRAManager) -> None:
        """Drop the copies of adapters that left the slots, were removed or were registered again."""
        for adapter_id, (weights, _) in list(self.resident.items()):
            if adapter_id not in lora.slot_of or lora.adapters.get(adapter_id) is not weights:
                del self.resident[adapter_id]

    def _modules(self, adapter_id: int, weights: LoRAWeights) -> SlotModules:
        entry = self.resident.get(adapter_id)
        if entry is None or entry[0] is not weights:
            assert weights.modules is not None
            modules = check_adapter_modules(weights.name, weights.modules, self.model)
            entry = (weights, materialize(modules, self.model, self.dtype, self.device))
            self.resident[adapter_id] = entry
        return entry[1]

    def step(self, lora: LoRAManager | None, token_adapters: list[int], logit_adapters: list[int]) -> AdapterStep | None:
        """The step's AdapterStep (None when no adapter in it has modules of its own). `token_adapters`:
        the adapter id of each flat token; `logit_adapters`: of each row that gets logits. Call it
        after the LoRA manager assigned this step's slots."""
        if lora is None:
            return None
        if self.resident:
            self.sync(lora)
        groups: list[AdapterGroup] = []
        vocab = self.model.config.vocab_size
        for adapter_id in sorted(set(token_adapters) - {0}):
            weights = lora.adapters.get(adapter_id)
            if weights is None or weights.modules is None:
                continue
            modules = self._modules(adapter_id, weights)
            vocab = max(vocab, modules.vocab_size)
            tokens = [i for i, a in enumerate(token_adapters) if a == adapter_id]
            rows = [i for i, a in enumerate(logit_adapters) if a == adapter_id]
            groups.append(AdapterGroup(modules, to_device(tokens, self.device, torch.long),
                                       to_device(rows, self.device, torch.long) if rows else None))
        return AdapterStep(groups, vocab) if groups else None
