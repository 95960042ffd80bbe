"""LoRA on an image-text model's vision tower (FastVisionModel.get_peft_model with
finetune_vision_layers=True): the adapter's modules under the tower or projector are taken out of
its per-token LoRA (the language layers' adapter slots) into `LoRAWeights.vision`, checked against
the tower's linears. Served per request (sloth_serve.models.tower_lora adds them in the tower's
pass over that adapter's images) or merged into the tower's 16-bit linears at load (--merge-lora)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..models.gemma_vision import vision_module_name
from ..models.tower_lora import vision_lora_layers
from .adapter_config import AdapterError

# Our fused projection names (sloth_serve.models.fused_names.FUSED) back to the checkpoint's, per slice.
_UNFUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Module names of image-text models' vision encoders and projectors.
VISION_MODULES = frozenset({"visual", "vision_tower", "vision_model", "multi_modal_projector"})
# Qwen-VL's vision encoder (and merger) as checkpoints and PEFT name it; Gemma 3's tower and
# projector are named by gemma_vision.vision_module_name.
_VISUAL_PREFIXES = ("model.visual.", "visual.")


def tower_module_name(name: str) -> str | None:
    """Our name for a module of the vision tower or projector, from its PEFT name (None: not one)."""
    for prefix in _VISUAL_PREFIXES:
        if name.startswith(prefix):
            return "visual." + name[len(prefix) :]
    return vision_module_name(name)


def is_vision_module(module: str) -> bool:
    return any(part in VISION_MODULES for part in module.split("."))


# An adapter's LoRA factors by (module, slice index): A [r, in], B * scale [out, r] (LoRAWeights.tensors)
Factors = dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]


def take_vision_lora(adapter: str, tensors: Factors,
                     linears: Mapping[str, nn.Module] | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's LoRA on vision modules, taken out of `tensors` (LoRAWeights.tensors) and keyed by
    the tower's linears they train (`linears`: the model's vision_lora_layers(); None for a model
    whose tower takes no LoRA). AdapterError, naming the module, for one that cannot be served."""
    taken: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, index in [key for key in tensors if is_vision_module(key[0])]:
        if linears is None:
            raise AdapterError(f"adapter {adapter!r} trains the vision encoder ({module}), which this model "
                               "serves without LoRA (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3 and Mistral 3 take it); merge "
                               "the adapter into the base and serve that")
        name = tower_module_name(module)
        parent, _, leaf = (name or module).rpartition(".")
        if leaf in _UNFUSED:
            if not 0 <= index < len(_UNFUSED[leaf]):
                raise AdapterError(f"adapter {adapter!r} trains {module} whole, a vision module sloth-serve "
                                   "does not serve; save it again with PEFT")
            leaf = _UNFUSED[leaf][index]
        ours = f"{parent}.{leaf}"
        linear = linears.get(ours) if name is not None else None
        if linear is None:
            raise AdapterError(f"adapter {adapter!r} targets {ours}, which is no linear layer of this model's "
                               "vision tower (LoRA is served on those); trained for another base?")
        a, b = tensors.pop((module, index))
        want = (int(getattr(linear, "out_features", -1)), int(getattr(linear, "in_features", -1)))
        if (b.shape[0], a.shape[1]) != want:
            raise AdapterError(f"adapter {adapter!r} does not fit this model: {ours} is {want[0]}x{want[1]}, "
                               f"the adapter's is {b.shape[0]}x{a.shape[1]} (trained for another base?)")
        taken[ours] = (a, b)
    return taken


@torch.no_grad()
def merge_vision_lora(model: object, adapter: str, tensors: Factors, dtype: torch.dtype) -> int:
    """W += scale * B @ A for every vision-tower or projector linear the adapter trains, taken out
    of `tensors` (the rest merges into the language model). Returns how many were merged."""
    linears = vision_lora_layers(model)
    vision = take_vision_lora(adapter, tensors, linears)
    for name, (a, b) in vision.items():
        assert linears is not None
        linear = linears[name]
        w = linear.weight
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise AdapterError(f"adapter {adapter!r}: {name} is stored quantized ({tuple(w.shape)}), which "
                               "--merge-lora cannot change; serve the adapter per request instead")
        linear.weight = nn.Parameter((w.float() + b.to(w.device) @ a.to(w.device)).to(dtype), requires_grad=False)
    return len(vision)
