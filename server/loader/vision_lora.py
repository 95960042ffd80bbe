"""LoRA on an image-text model's vision tower (FastVisionModel.get_peft_model with
finetune_vision_layers=True), merged at load (--merge-lora) into the tower's 16-bit linears: the
tower runs once per image in the prefill, outside the per-token adapter slots, so it is not
hot-swapped per request; the language layers' part of the same adapter merges as usual."""

from __future__ import annotations

import torch
from torch import nn

from ..models.gemma_vision import vision_module_name
from ..models.weights import NATIVE_VISION
from .adapter_config import AdapterError
from .peft import LoRAWeights

# Our fused projection names (sloth_serve.models.fused_names.FUSED) back to the checkpoint's, per slice.
_UNFUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@torch.no_grad()
def merge_vision_lora(model: object, weights: LoRAWeights, dtype: torch.dtype) -> int:
    """W += scale * B @ A for every vision-tower or projector module the adapter trains, taken out
    of `weights` (the rest merges into the language model). Returns how many were merged."""
    if not isinstance(model, NATIVE_VISION):
        return 0
    merged = 0
    for module, index in list(weights.tensors):
        name = vision_module_name(module.removeprefix("base_model.model."))
        if name is None:
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in _UNFUSED:
            if not 0 <= index < len(_UNFUSED[leaf]):
                raise AdapterError(f"adapter {weights.name!r} trains {module} whole, a vision module sloth-serve "
                                   "cannot merge; save it again with PEFT")
            leaf = _UNFUSED[leaf][index]
        try:
            linear = model.get_submodule(f"{parent}.{leaf}")
        except AttributeError:
            linear = None
        a, b = weights.tensors.pop((module, index))
        if not isinstance(linear, nn.Linear):
            raise AdapterError(f"adapter {weights.name!r} targets {module}, which this model's vision tower lacks "
                               "(trained for another base?)")
        if (b.shape[0], a.shape[1]) != tuple(linear.weight.shape):
            raise AdapterError(f"adapter {weights.name!r} does not fit this model: {parent}.{leaf} is "
                               f"{tuple(linear.weight.shape)}, the adapter's is {(b.shape[0], a.shape[1])}")
        w = linear.weight
        linear.weight = nn.Parameter((w.float() + b.to(w.device) @ a.to(w.device)).to(dtype), requires_grad=False)
        merged += 1
    return merged
