"""Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, or PEFT's
adapter_model.bin) into the per-projection A and scaled B matrices that the engine's LoRA slots
hold. Every tensor on disk is used or the load stops naming it (sloth_serve.loader.adapter_layout)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..models.fused_names import FUSED, fused_target
from ..models.moe import expert_target, moe_checkpoint_name
from ..models.weights import text_model_name
from .adapter_config import AdapterConfig, AdapterError, read_adapter_config
from .adapter_layout import (
    SAFETENSORS,
    LoRAPair,
    TensorSpec,
    check_adapter_folder,
    plan_layout,
    read_safetensors_header,
    weights_file,
    where,
)
from .adapter_modules import AdapterModules, read_adapter_modules
from .expert_adapter import (
    ExpertUpdate,
    ParameterLoRA,
    PendingExpertLoRA,
    resolve_expert_lora,
)
from .vision_lora import take_vision_lora

if TYPE_CHECKING:
    from torch import nn

    from ..models.layers import LoRALinear
    from ..models.moe import Experts

logger = logging.getLogger(__name__)

__all__ = ["AdapterError", "LoRAWeights", "check_fits", "load_lora", "read_adapter_config", "startup_lora_rank"]

# The slice index of a LoRA trained on a fused projection as one module (Phi-3's qkv_proj and
# gate_up_proj): its B spans every slice; check_fits splits it once the slices' sizes are known.
WHOLE = -1
_FUSED_MODULES = {fused for fused, _ in FUSED.values()}

# torch dtypes by safetensors' names, so a .bin file's tensors are named as a .safetensors file's
DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
               torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
               torch.bool: "BOOL"}


@dataclass(slots=True)
class LoRAWeights:
    name: str
    path: str
    rank: int  # the widest of its modules' ranks
    base_model: str | None
    # (our module name, slice index) -> (A [r, in], B * scale [out, r]), float32 on the host; index
    # WHOLE (a fused projection trained as one module) until check_fits splits it into the slices
    tensors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]
    # Tensors that are not LoRA factors (modules_to_save copies, trainable tokens), keys as saved
    full_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: AdapterModules | None = None  # those tensors sorted by module (sloth_serve.loader.adapter_modules)
    # LoRA on MoE experts: as read, until check_fits resolves it against the model's experts into
    # `experts` (experts module -> projection -> (A [E, R, in], B * scale [E, out, R]))
    expert_pending: PendingExpertLoRA = field(default_factory=PendingExpertLoRA)
    experts: dict[str, ExpertUpdate] = field(default_factory=dict)
    # LoRA on the vision tower: moved out of `tensors` by check_fits (server/loader/vision_lora.py),
    # our tower module name -> (A [r, in], B * scale [out, r]); applied when the tower encodes this
    # adapter's images
    vision: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.name == SAFETENSORS:
        read_safetensors_header(path)  # a truncated or malformed file, said plainly
        try:
            # Read whole into memory: load_file's tensors stay mapped onto the file, so a trainer
            # writing the folder again in place would change (or, truncating it, crash with SIGBUS)
            # an adapter in use; one read also gives one version of the file.
            tensors = load_safetensors(path.read_bytes())
            return dict(sorted(tensors.items()))  # by name, as load_file gives them (messages name the first)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterError(f"{where(path)} is not a readable safetensors file ({exc}); save it again") from exc
    try:  # tensors only: weights_only refuses any other pickled object (no code runs)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an untrusted file: whatever the unpickler raises means "unreadable"
        raise AdapterError(f"{where(path)} could not be read as PyTorch tensors ({type(exc).__name__}: {exc}); "
                           "save the adapter with safe_serialization=True") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterError(f"{where(path)} does not hold a dictionary of named tensors; save the adapter again")
    return state


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")), tuple(t.shape))
            for k, t in tensors.items()}


def adapter_rank(folder: Path) -> int:
    """The widest rank of a checked adapter folder (a .bin one is read whole: only torch reads it)."""
    cfg, layout = check_adapter_folder(folder)
    if layout is None:
        path = weights_file(folder)
        layout = plan_layout(cfg, specs_of(read_tensors(path)), where(path))
    return layout.rank


MIN_SLOT_RANK = 16  # vLLM's default --max-lora-rank, and Unsloth's default adapter rank


def startup_lora_rank(folders: list[Path]) -> int:
    """The slot rank that fits every adapter folder given (at least MIN_SLOT_RANK), from the ranks of
    the tensors on disk. A folder that cannot be served is passed over with a warning: requests for
    it get a 400 saying why (a bad folder in a --lora-dir must not stop the server)."""
    ranks = [MIN_SLOT_RANK]
    for folder in folders:
        try:
            ranks.append(adapter_rank(folder))
        except (AdapterError, OSError) as exc:
            logger.warning("adapter folder %s cannot be served and is passed over: %s", folder, exc)
    return max(ranks)


def load_lora(name: str, folder: str | Path, max_rank: int) -> LoRAWeights:
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    path = weights_file(folder)
    raw = read_tensors(path)
    layout = plan_layout(cfg, specs_of(raw), where(path))
    if layout.rank > max_rank:
        raise AdapterError(f"adapter {name!r} has rank {layout.rank} but the adapter slots hold rank {max_rank} "
                           f"(set at start-up from the adapters given then); restart with --max-lora-rank "
                           f"{layout.rank} or more")
    tensors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    pending = PendingExpertLoRA()
    for pair in layout.pairs:
        if _read_expert_pair(pair, raw, cfg, pending):
            continue
        ours, index = fused_target(pair.module + ".weight")
        ours = ours.removesuffix(".weight")
        if index is None:
            index = WHOLE if ours.rpartition(".")[2] in _FUSED_MODULES else 0
        a, b = raw[pair.a_key].float(), raw[pair.b_key].float()
        tensors[(ours, index)] = (a, b * cfg.scale_for(pair.module))
    # Whole-module tensors (modules_to_save, trainable tokens): their reader serves or refuses each.
    full_tensors = {key: raw[key] for key in layout.other_keys}
    modules = read_adapter_modules(name, cfg.raw, full_tensors)
    if not tensors and modules is None and not pending:
        raise AdapterError(f"adapter {name!r} ({folder.name}) holds no LoRA weights")
    return LoRAWeights(name, str(folder), layout.rank, cfg.base_model, tensors, full_tensors, modules, pending)


def _read_expert_pair(pair: LoRAPair, raw: Mapping[str, torch.Tensor], cfg: AdapterConfig,
                      pending: PendingExpertLoRA) -> bool:
    """Keep a LoRA on experts (a target_parameters one, or one expert's module) for check_fits to
    resolve against the model; False for any other LoRA."""
    a, b = raw[pair.a_key].float(), raw[pair.b_key].float()
    if pair.parameters == ("weight",):  # a linear's 2-D weight: PEFT's LoRA on it is the module's LoRA
        return False
    if pair.parameters:
        module = moe_checkpoint_name(pair.module + ".").removesuffix(".")
        scales = {p: cfg.scale_for(f"{pair.module}.{p}") for p in pair.parameters}
        pending.parameters.append(ParameterLoRA(module, a, b, scales))
        return True
    target = expert_target(pair.module + ".weight")
    if target is None:
        return False
    module, part, expert = target
    if expert is None or part.endswith("bias"):
        raise AdapterError(f"{pair.a_key}: a LoRA on {pair.module} as one linear over every expert, which "
                           f"sloth-serve does not serve; train the experts with target_parameters (or per expert)")
    pending.per_expert[(module, part, expert)] = (a, b * cfg.scale_for(pair.module))
    return True


def check_fits(weights: LoRAWeights, layers: Mapping[str, LoRALinear],
               experts: Mapping[str, Experts] | None = None, vision: Mapping[str, nn.Module] | None = None) -> None:
    """Every LoRA module of the adapter is a projection of this model, of the same shape: what makes
    copying it into a slot (or merging it) safe. A LoRA on a whole fused projection becomes one per
    slice, each with the module's A and its rows of B (exact: every slice computes B_i A x). LoRA on
    MoE experts is resolved against `experts` (the model's, by name; None: a model without expert
    LoRA) into one update per experts module (server/loader/expert_adapter.py); LoRA on the vision
    tower against its linears `vision` (None: a model whose tower takes none) into `weights.vision`."""
    if weights.expert_pending:
        weights.experts.update(resolve_expert_lora(weights.name, weights.expert_pending, experts or {}))
        weights.expert_pending = PendingExpertLoRA()
    weights.vision.update(take_vision_lora(weights.name, weights.tensors, vision))
    text_model_names(weights, layers)
    split_whole_modules(weights, layers)
    for (module, index), (a, b) in weights.tensors.items():
        layer = layers.get(module)
        if layer is None and ".experts." in f"{module}.":
            raise AdapterError(f"adapter {weights.name!r} trains the MoE experts ({module}) in a layout sloth-serve "
                               f"does not read; merge it into the base and serve that")
        if layer is None or index >= len(layer.out_slices):
            raise AdapterError(f"adapter {weights.name!r} targets {module}, which the model lacks (LoRA is served "
                               f"on the attention and MLP projections of its layers); trained for another base?")
        want = (layer.out_slices[index], layer.in_features)
        if (b.shape[0], a.shape[1]) != want:
            raise AdapterError(
                f"adapter {weights.name!r} does not fit this model: {module} is {want[0]}x{want[1]}, "
                f"the adapter's is {b.shape[0]}x{a.shape[1]} (trained for another base?)"
            )


def text_model_names(weights: LoRAWeights, layers: Mapping[str, LoRALinear]) -> None:
    """An adapter trained on an image-text model (Gemma3ForConditionalGeneration) names the text
    model's projections under its language model (model.language_model.* or language_model.model.*):
    rename those to the text model's names (LoRA on the vision tower is taken out before)."""
    for module, index in list(weights.tensors):
        text = text_model_name(module, multimodal=True)
        if module not in layers and text is not None and text in layers:
            weights.tensors[(text, index)] = weights.tensors.pop((module, index))


def split_whole_modules(weights: LoRAWeights, layers: Mapping[str, LoRALinear]) -> None:
    """Replace each WHOLE entry (A [r, in], B [sum of the slices, r]) by one entry per slice of the
    layer, sharing A; PEFT trained the module as one linear, so y_i = B_i A x is its output's slice i."""
    for module, index in [key for key in weights.tensors if key[1] == WHOLE]:
        a, b = weights.tensors.pop((module, index))
        layer = layers.get(module)
        if layer is None:
            raise AdapterError(f"adapter {weights.name!r} targets {module}, which the model lacks (LoRA is served "
                               f"on the attention and MLP projections of its layers); trained for another base?")
        want = (sum(layer.out_slices), layer.in_features)
        if (b.shape[0], a.shape[1]) != want:
            raise AdapterError(f"adapter {weights.name!r} does not fit this model: {module} is {want[0]}x{want[1]}, "
                               f"the adapter's is {b.shape[0]}x{a.shape[1]} (trained for another base?)")
        for i, part in enumerate(b.split(layer.out_slices)):
            if (module, i) in weights.tensors:
                raise AdapterError(f"adapter {weights.name!r} trains {module} both whole and in parts; save it again")
            weights.tensors[(module, i)] = (a, part)
