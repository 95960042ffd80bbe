"""Load a model folder through Unsloth (`FastLanguageModel.from_pretrained(load_in_4bit=True)`, then
`for_inference`), and adopt its weights into our own model: 4-bit layers keep bitsandbytes' packed
NF4 bytes and quantization state, 16-bit tensors are taken as they are. The Hugging Face module is
released afterwards, so no dequantized copy of a 4-bit weight stays in memory."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import torch

from sloth_kernels.nf4_format import NF4Weight

from ..models.config import ModelConfig
from ..models.moe import expert_weight_names
from ..models.weights import CausalLM, build_model, text_model_name
from ..startup_clock import startup_phase
from .nf4_disk import with_4bit_from_disk

logger = logging.getLogger(__name__)
T = TypeVar("T")


def load_hf_with_unsloth(folder: Path, max_seq_length: int, vision: bool = False) -> torch.nn.Module:
    """`vision`: an image-text model, loaded as Unsloth's vision notebooks do (FastVisionModel)."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Imported late (it patches transformers on import): a phase of its own, seconds on a GPU machine.
    with startup_phase("import Unsloth", "load", log="unsloth" not in sys.modules):
        from unsloth import FastLanguageModel, FastVisionModel

    from .gpt_oss_layout import unsloth_gpt_oss_classes

    fast = FastVisionModel if vision else FastLanguageModel
    # A 16-bit checkpoint is quantized to NF4 here, as bitsandbytes loads it: inseparable from the read.
    with startup_phase(f"read {folder.name} through Unsloth (from_pretrained, for_inference)", "load"):
        with unsloth_gpt_oss_classes(folder):  # Unsloth's per-expert gpt-oss layout, recognized from the disk
            model, _tokenizer = fast.from_pretrained(
                model_name=str(folder), max_seq_length=max_seq_length, load_in_4bit=True, dtype=None,
                local_files_only=True,
            )
        fast.for_inference(model)
    return model


def hf_weights(hf_model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor | NF4Weight]]:
    """Every weight of the HF model by its checkpoint name; bitsandbytes 4-bit linears as NF4Weight."""
    for name, module in hf_model.named_modules():
        weight = getattr(module, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            yield f"{name}.weight", NF4Weight.from_bnb(weight.data, quant_state)  # type: ignore[union-attr]
            bias = getattr(module, "bias", None)
            if bias is not None:
                yield f"{name}.bias", bias.data
            continue
        # Each module's own parameters only (its children's come with them): a container may hold some,
        # as MoE experts hold their 3-D weights beside an activation module.
        for pname, param in module.named_parameters(recurse=False):
            if quant_state is None:
                yield (f"{name}.{pname}" if name else pname), param.data


def load_and_adopt(folder: Path, max_seq_length: int, dtype: torch.dtype, device: torch.device) -> CausalLM:
    start = time.perf_counter()
    cfg = ModelConfig.from_folder(folder)
    # Mistral 3 / Pixtral LLaVA have no AutoModelForCausalLM class, and Qwen3.5's is its text model alone
    # (no vision encoder): read as Unsloth's vision notebooks do
    qwen3_5_vision = cfg.family in ("qwen3_5", "qwen3_5_moe") and cfg.vision_config is not None
    hf_model = load_hf_with_unsloth(folder, max_seq_length, cfg.vision_projector is not None or qwen3_5_vision)
    loaded = time.perf_counter()
    hf_bytes = _gpu_bytes(device)
    adopted: set[str] = set()
    # 4-bit weights transformers 5 could not load in 4-bit (per-expert MoE experts) are read from the disk.
    named = with_4bit_from_disk(folder, hf_weights(hf_model), cfg.num_experts)
    with startup_phase("adopt the weights into the engine's layers (NF4 bytes shared, projections fused)",
                       "convert"):
        model = build_model(cfg, _recorded(named, adopted), dtype, device)
        check_all_tensors_read(folder, adopted, cfg.multimodal, cfg.num_experts,
                               cfg.vision_config is not None)
        del hf_model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    num_4bit = sum(1 for m in model.modules() if getattr(m, "is_quantized", False))
    logger.info("loaded %s through Unsloth in %.1fs (adoption %.1fs): %d linear layers kept in 4-bit", folder,
                time.perf_counter() - start, time.perf_counter() - loaded, num_4bit)
    if device.type == "cuda":
        # Adoption shares the NF4 bytes with the Unsloth model, so the allocation after releasing it
        # should be no larger than before: a dense copy of a 4-bit weight would show here.
        logger.info("GPU memory allocated: %.2f GiB after the Unsloth load, %.2f GiB after adoption "
                    "(peak %.2f GiB)", hf_bytes / 2**30, _gpu_bytes(device) / 2**30,
                    torch.cuda.max_memory_allocated(device) / 2**30)
    return model


def _recorded(named: Iterator[tuple[str, T]], names: set[str]) -> Iterator[tuple[str, T]]:
    for name, value in named:
        names.add(name)
        yield name, value


# bitsandbytes serializes a 4-bit weight's quantization state beside it as `<name>.weight.<part>`.
_QUANT_STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state")
# Buffers some checkpoints carry that every loader recomputes (rotary tables).
_RECOMPUTED = ("rotary_emb.inv_freq",)


def disk_tensor_names(folder: Path) -> dict[str, str]:
    """Every tensor of the folder's safetensors files (headers only) -> its file; a 4-bit weight's
    quantization-state tensors count as the weight itself."""
    from safetensors import safe_open

    names: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                base, sep, part = key.partition(".weight.")
                if sep and part.split(".")[0] in _QUANT_STATE_PARTS:
                    key = f"{base}.weight"
                names[key] = path.name
    return names


def check_all_tensors_read(folder: Path, adopted: set[str], multimodal: bool = False, num_experts: int = 0,
                           vision_served: bool = False) -> None:
    """Stop the load when a tensor on disk did not reach our model: transformers drops checkpoint
    keys its model class does not expect (with a warning at most), and serving without them would
    not be the model that was trained. `multimodal`: an image-text checkpoint whose text model is
    served; names compare as the text model's (disk and transformers may use different layouts),
    and the vision tower's tensors are counted in the log, not loaded. `num_experts`: expert weights
    compare per expert, whether stored one by one or as 3-D tensors of every expert. `vision_served`:
    the vision tower and projector are served too (Gemma 3 with images), so theirs must be read."""
    from ..models.gemma_vision import vision_module_name

    read = {n for name in adopted for n in expert_weight_names(text_model_name(name, multimodal) or name, num_experts)}
    read_vision = {vision_module_name(name) for name in adopted} if vision_served else set()
    unread: dict[str, str] = {}
    vision = 0
    for key, file in disk_tensor_names(folder).items():
        name = text_model_name(key, multimodal)
        if name is None and vision_served:
            if vision_module_name(key) not in read_vision:
                unread[key] = file
        elif name is None:
            vision += 1
        elif not expert_weight_names(name, num_experts) <= read and not key.endswith(_RECOMPUTED):
            unread[key] = file
    if vision:
        logger.info("%s: %d tensors on disk belong to the vision tower and projector: not loaded (text only)",
                    folder, vision)
    if unread:
        first = sorted(unread)[0]
        raise ValueError(
            f"{folder / unread[first]}: {len(unread)} tensor(s) on disk were not loaded (first: {first!r}); "
            f"sloth-serve does not serve a model with weights left out. Check that config.json's "
            f"architectures matches the checkpoint, or remove the extra tensors"
        )


def _gpu_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
