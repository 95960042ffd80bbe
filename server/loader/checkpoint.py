"""Load a model folder into our own model: weights (through Unsloth, or the 16-bit safetensors
directly), stop tokens, and an adapter to serve or merge."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from ..models.config import ModelConfig
from ..models.families import route_of
from ..models.moe import expert_modules
from ..models.mxfp4 import is_mxfp4, mxfp4_dequantized
from ..models.weights import CausalLM, build_model, iter_checkpoint
from ..startup_clock import startup_phase
from .adapter_modules import merge_adapter_modules
from .expert_adapter import merge_expert_update
from .folders import is_adapter_folder, read_json_object, resolve_adapter_base
from .nf4_disk import grouped_4bit, is_bnb_4bit
from .peft import check_fits, load_lora
from .vision_lora import merge_vision_lora

if TYPE_CHECKING:
    from sloth_kernels.nf4_format import NF4Weight

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    model: CausalLM
    folder: Path  # the base model's folder (tokenizer, config)
    eos_token_ids: frozenset[int]
    adapter_folder: Path | None = None  # set when --model named an adapter folder


def read_eos_token_ids(folder: Path) -> frozenset[int]:
    """EOS ids from generation_config.json (what `generate` stops on), else config.json."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text()).get("eos_token_id")
        if value is not None:
            return frozenset(int(i) for i in (value if isinstance(value, list) else [value]))
    return frozenset()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(folder: str | Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Load safetensors directly (no Unsloth): 16-bit weights, or a bitsandbytes 4-bit folder's
    weights as stored (NF4 kept packed)."""
    folder = Path(folder)
    cfg = ModelConfig.from_folder(folder)
    raw = json.loads((folder / "config.json").read_text())
    named: Iterator[tuple[str, torch.Tensor | NF4Weight]] = iter_checkpoint(folder)
    if is_mxfp4(raw):
        named = mxfp4_dequantized(iter_checkpoint(folder), dtype)
    elif is_bnb_4bit(raw):
        named = grouped_4bit(iter_checkpoint(folder))
    return build_model(cfg, named, dtype, device)


def load_checkpoint(
    folder: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "safetensors",
    max_seq_length: int = 2048,
    merge_lora: str | None = None,
    max_lora_rank: int = 64,
) -> LoadedModel:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    adapter_folder = None
    if is_adapter_folder(folder):
        adapter_folder, folder = folder, resolve_adapter_base(folder)
        logger.info("%s is a LoRA adapter; its base is %s", adapter_folder, folder)
    elif not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds neither config.json (a model) nor adapter_config.json (an adapter)")
    cfg = read_json_object(folder / "config.json")
    quant = cfg.get("quantization_config")
    mxfp4 = is_mxfp4(cfg)  # gpt-oss's originals: read by our own loader whatever the format
    # The path (native / generic / refused) comes from config.json, before any weight is read.
    path = route_of(cfg).path
    # Native models read bitsandbytes 4-bit folders as stored (server/loader/nf4_disk.py).
    readable = mxfp4 or (path == "native" and is_bnb_4bit(cfg))
    if load_format == "safetensors" and isinstance(quant, dict) and not readable:
        raise ValueError(f"{folder} is quantized ({quant.get('quant_method', 'unknown method')}); "
                         f"--load-format safetensors reads 16-bit and bitsandbytes 4-bit checkpoints of natively "
                         f"served models only: use --load-format unsloth")
    if path in ("generic", "vision"):
        from .generic import load_generic

        # GenericCausalLM has the native models' interface (forward, compute_logits, lora_layers,
        # config) without being one of their classes: typed as them for the engine.
        # Through Unsloth its reading is timed inside (as load): what is left here is the conversion.
        with startup_phase(f"load {folder.name} (transformers' modules, our NF4 linears)",
                           "convert" if load_format == "unsloth" else "load"):
            model = cast(CausalLM, load_generic(folder, dtype, device, load_format, max_seq_length, path == "vision"))
    elif load_format == "unsloth" and not mxfp4:
        from .unsloth import load_and_adopt  # imports Unsloth: only on this path

        model = load_and_adopt(folder, max_seq_length, dtype, device)  # times its reading and its adoption
    else:
        # Read and placed tensor by tensor (fused projections filled as they come): one phase.
        with startup_phase(f"read {folder.name}'s safetensors into the model", "load"):
            model = load_model(folder, dtype, device)
    if merge_lora:
        with startup_phase(f"merge adapter {Path(merge_lora).name} into the base", "convert"):
            merge_adapter(model, Path(merge_lora), max_lora_rank, dtype)
    return LoadedModel(model, folder, read_eos_token_ids(folder), adapter_folder)


@torch.no_grad()
def merge_adapter(model: CausalLM, adapter: Path, max_rank: int, dtype: torch.dtype) -> None:
    """W += scale * B @ A in 16-bit for every projection the adapter targets. A 4-bit layer becomes
    dense (its NF4 bytes are dequantized first), which costs memory: logged."""
    weights = load_lora(adapter.name, adapter, max_rank)
    vision = merge_vision_lora(model, weights.name, weights.tensors, dtype)  # the vision tower: 16-bit, merged here
    layers = model.lora_layers()
    experts = expert_modules(model)
    check_fits(weights, layers, experts)  # every part checked before the first layer changes
    added = sum(merge_expert_update(experts[m], update, dtype) for m, update in weights.experts.items())
    by_module: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for (module, index), (a, b) in weights.tensors.items():
        by_module.setdefault(module, []).append((index, a, b))
    for module, parts in by_module.items():
        layer = layers[module]
        was_quantized = layer.is_quantized
        dense = layer.dequantized_weight().float()
        for index, a, b in parts:
            start = sum(layer.out_slices[:index])
            dense[start : start + layer.out_slices[index]] += b.to(dense.device) @ a.to(dense.device)
        layer.set_dense(dense.to(dtype))
        if was_quantized:
            added += dense.numel() * dense.new_empty((), dtype=dtype).element_size()
    if weights.modules is not None:  # its own embed_tokens / lm_head / norms replace the base's
        merge_adapter_modules(adapter.name, weights.modules, model, dtype)
    logger.warning("merged adapter %s into the base (%d vision tower layers among them); layers made dense cost "
                   "%.1f MiB more than 4-bit (re-quantizing would change outputs, so they stay 16-bit)", adapter, vision,
                   added / 2**20)
