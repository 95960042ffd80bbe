"""Linears of a transformers model on the generic path: each nn.Linear or bitsandbytes Linear4bit
becomes a GenericLinear (our LoRALinear: NF4 kernels, multi-LoRA slots) that reads the step's
adapter slots from the shared step object, and q/k/v and gate/up are grouped under the fused names
adapters are read into (SliceGroup), so the LoRA manager fills them as it fills native models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .fused_names import fused_target
from .layers import LoRALinear

if TYPE_CHECKING:
    from .generic_step import GenericStep


class GenericLinear(LoRALinear):
    """A LoRALinear of one output slice that takes the model's [..., in] activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool, step: GenericStep,
                 dtype: torch.dtype) -> None:
        super().__init__(in_features, [out_features], bias=bias)
        self.step = step
        self.dtype = dtype  # what the layer computes in (the engine's dtype), whatever the model hands it

    def forward(self, x: torch.Tensor, meta: Any = None) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        meta = self.step.meta
        slots = None if meta is None else meta.lora_slots
        if slots is not None and self.lora_a_stacked is not None and slots.shape[0] != flat.shape[0]:
            raise RuntimeError(f"a linear of {flat.shape[0]} rows in a step of {slots.shape[0]} tokens: adapters apply "
                               "per token, so this projection cannot carry a LoRA")
        y = super().forward(flat.to(self.dtype).contiguous(), meta)  # the kernels take dense rows
        return y.to(x.dtype).reshape(*lead, y.shape[-1])


def adopt_linear(module: nn.Module, step: GenericStep, dtype: torch.dtype, device: torch.device) -> GenericLinear:
    """Our layer holding the module's weight: bitsandbytes NF4 bytes as they are (never a dense
    copy), other 4-bit codes (FP4) dequantized, 16-bit weights moved to `dtype`."""
    from sloth_kernels.nf4 import dequantize_nf4_ref
    from sloth_kernels.nf4_format import NF4Weight, is_nf4_code

    weight: torch.Tensor = module.weight  # type: ignore[assignment]  # nn.Linear's, or bitsandbytes' Params4bit
    bias = getattr(module, "bias", None)
    state = getattr(weight, "quant_state", None)
    out_features, in_features = (tuple(state.shape) if state is not None else tuple(weight.shape))
    with torch.device("meta"):  # every tensor of it is replaced below
        layer = GenericLinear(int(in_features), int(out_features), bias is not None, step, dtype)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    if state is None:
        layer.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype), requires_grad=False)
        return layer
    nf4 = NF4Weight.from_bnb(weight.data, state)
    if is_nf4_code(nf4.code):
        layer.set_quantized(0, nf4 if nf4.device == device else nf4.to(device))
    else:
        layer.weight = nn.Parameter(dequantize_nf4_ref(nf4).to(device=device, dtype=dtype), requires_grad=False)
    return layer


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a bitsandbytes 4-bit linear (a subclass of nn.Linear whose weight has a quant state).
    A subclass with a forward of its own (a router that also picks experts, as Phi-MoE's) stays as it is."""
    if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
        return False
    return type(module).forward is nn.Linear.forward or getattr(module.weight, "quant_state", None) is not None


class SliceGroup:
    """The projections an adapter names together (q|k|v, gate|up), each its own GenericLinear, seen
    by the LoRA manager and --merge-lora as one fused LoRALinear of several output slices."""

    def __init__(self, parts: dict[int, GenericLinear]) -> None:
        self.parts = [parts.get(i) for i in range(max(parts) + 1)]
        present = [p for p in self.parts if p is not None]
        self.in_features = present[0].in_features
        self.out_slices = [p.out_slices[0] if p is not None else 0 for p in self.parts]

    def create_lora_slots(self, num_slots: int, rank: int, dtype: torch.dtype, device: torch.device,
                          ranks: torch.Tensor | None = None) -> None:
        for part in self._present():
            part.create_lora_slots(num_slots, rank, dtype, device, ranks)

    @property
    def lora_a(self) -> list[torch.Tensor | None]:
        return [p.lora_a[0] if p is not None else None for p in self.parts]

    @property
    def lora_b(self) -> list[torch.Tensor | None]:
        return [p.lora_b[0] if p is not None else None for p in self.parts]

    @property
    def is_quantized(self) -> bool:
        return all(p.is_quantized for p in self._present())

    def dequantized_weight(self) -> torch.Tensor:
        return torch.cat([p.dequantized_weight() for p in self._present()], dim=0)

    def set_dense(self, weight: torch.Tensor) -> None:
        start = 0
        for part in self._present():
            n = part.out_slices[0]
            part.set_dense(weight[start : start + n].clone())
            start += n

    def _present(self) -> list[GenericLinear]:
        return [p for p in self.parts if p is not None]


def lora_targets(linears: dict[str, GenericLinear]) -> dict[str, GenericLinear | SliceGroup]:
    """Our linears by the names sloth_serve.loader.peft reads adapters into (module name, slice)."""
    groups: dict[str, dict[int, GenericLinear]] = {}
    singles: dict[str, GenericLinear] = {}
    for name, layer in linears.items():
        target, index = fused_target(f"{name}.weight")
        target = target.removesuffix(".weight")
        if index is None:
            singles[target] = layer
        else:
            groups.setdefault(target, {})[index] = layer
    out: dict[str, GenericLinear | SliceGroup] = dict(singles)
    for target, parts in groups.items():
        if len({p.in_features for p in parts.values()}) == 1 and target not in singles:
            out[target] = SliceGroup(parts)
    return out
