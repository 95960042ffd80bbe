"""LoRA on an image-text model's vision tower (FastVisionModel.get_peft_model with
finetune_vision_layers=True): the adapter's modules under the tower or projector are taken out of
its per-token LoRA (the language layers' adapter slots) into `LoRAWeights.vision`, checked against
the tower's linears. Served per request (sloth_serve.models.tower_lora adds them in the tower's
pass over that adapter's images) or merged into the tower's 16-bit linears at load (--merge-lora)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..models.gemma_vision import vision_module_name
from ..models.tower_lora import vision_lora_layers
from .adapter_config import AdapterError

if TYPE_CHECKING:
    from .peft import LoRAWeights

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


def take_vision_lora(weights: LoRAWeights, linears: Mapping[str, nn.Module] | None) -> None:
    """Move the adapter's LoRA on vision modules from `weights.tensors` into `weights.vision`, each
    checked against the tower's linears (`linears`: the model's vision_lora_layers(); None for a
    model whose tower takes no LoRA). AdapterError, naming the module, for one that cannot be served."""
    for module, index in [key for key in weights.tensors if is_vision_module(key[0])]:
        if linears is None:
            raise AdapterError(f"adapter {weights.name!r} trains the vision encoder ({module}), which this model "
                               "serves without LoRA (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Gemma 3 take it); merge "
                               "the adapter into the base and serve that")
        name = tower_module_name(module)
        parent, _, leaf = (name or module).rpartition(".")
        if leaf in _UNFUSED:
            if not 0 <= index < len(_UNFUSED[leaf]):
                raise AdapterError(f"adapter {weights.name!r} trains {module} whole, a vision module sloth-serve "
                                   "does not serve; save it again with PEFT")
            leaf = _UNFUSED[leaf][index]
        ours = f"{parent}.{leaf}"
        linear = linears.get(ours) if name is not None else None
        if linear is None:
            raise AdapterError(f"adapter {weights.name!r} targets {ours}, which is no linear layer of this model's "
                               "vision tower (LoRA is served on those); trained for another base?")
        a, b = weights.tensors.pop((module, index))
        want = (int(getattr(linear, "out_features", -1)), int(getattr(linear, "in_features", -1)))
        if (b.shape[0], a.shape[1]) != want:
            raise AdapterError(f"adapter {weights.name!r} does not fit this model: {ours} is {want[0]}x{want[1]}, "
                               f"the adapter's is {b.shape[0]}x{a.shape[1]} (trained for another base?)")
        weights.vision[ours] = (a, b)


@torch.no_grad()
def merge_vision_lora(model: object, weights: LoRAWeights, dtype: torch.dtype) -> int:
    """W += scale * B @ A for every vision-tower or projector linear the adapter trains, taken out
    of `weights` (the rest merges into the language model). Returns how many were merged."""
    linears = vision_lora_layers(model)
    take_vision_lora(weights, linears)
    for name, (a, b) in weights.vision.items():
        assert linears is not None
        linear = linears[name]
        w = linear.weight
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise AdapterError(f"adapter {weights.name!r}: {name} is stored quantized ({tuple(w.shape)}), which "
                               "--merge-lora cannot change; serve the adapter per request instead")
        linear.weight = nn.Parameter((w.float() + b.to(w.device) @ a.to(w.device)).to(dtype), requires_grad=False)
    return len(weights.vision)
