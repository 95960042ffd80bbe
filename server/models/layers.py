"""Building blocks shared by the model families: a linear layer with multi-LoRA slots, and the
per-step metadata that attention and LoRA read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.attention import AttnMetadata
from kernels.lora import add_lora


@dataclass(slots=True)
class StepMetadata:
    """Everything a forward pass needs besides token ids and positions (nano-vllm's "context")."""

    attn: AttnMetadata
    lora_slots: torch.Tensor | None = None  # [T] int32 adapter slot per token, -1 for none
    active_lora_slots: list[int] | None = None  # the distinct slots used this step (host)


class LoRALinear(nn.Module):
    """y = x W^T (+ bias), then each output slice adds the LoRA of the slot its token selects.
    Fused projections (q|k|v, gate|up) have one slice per original projection."""

    def __init__(self, in_features: int, out_slices: list[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_slices = out_slices
        self.weight = nn.Parameter(torch.empty(sum(out_slices), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(sum(out_slices)), requires_grad=False) if bias else None
        self.lora_a: list[torch.Tensor] = []  # per slice [num_slots, rank, in_features]
        self.lora_b: list[torch.Tensor] = []  # per slice [num_slots, out_slice, rank], scale folded in

    def create_lora_slots(self, num_slots: int, rank: int) -> None:
        w = self.weight
        self.lora_a = [w.new_zeros(num_slots, rank, self.in_features) for _ in self.out_slices]
        self.lora_b = [w.new_zeros(num_slots, n, rank) for n in self.out_slices]

    def forward(self, x: torch.Tensor, meta: StepMetadata | None = None) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.lora_a and meta is not None and meta.lora_slots is not None:
            offset = 0
            for a, b, n in zip(self.lora_a, self.lora_b, self.out_slices, strict=True):
                add_lora(y[:, offset : offset + n], x, a, b, meta.lora_slots, meta.active_lora_slots)
                offset += n
        return y
