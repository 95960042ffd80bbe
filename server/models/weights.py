"""Fill our model from a Hugging Face checkpoint folder (safetensors), fusing q|k|v and gate|up."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from kernels.rope import rope_cos_sin, rope_inv_freq
from server.models.config import ModelConfig
from server.models.layers import LoRALinear
from server.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from kernels.nf4 import NF4Weight

# HF projection name -> (our fused module, slice index)
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key)


def fused_target(name: str) -> tuple[str, int | None]:
    """Map an HF parameter name to ours, and the slice of a fused projection it fills."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in FUSED:
            fused, index = FUSED[part]
            return ".".join([*parts[:i], fused, *parts[i + 1 :]]), index
    return name, None


def load_weights(
    model: LlamaForCausalLM,
    named: Iterator[tuple[str, torch.Tensor | NF4Weight]],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Fill a model built on the meta device. Dense tensors are moved in (fused projections get
    their slices copied into one tensor); NF4 weights are adopted as they are, never expanded."""
    loaded: set[tuple[str, int | None]] = set()
    for hf_name, value in named:
        if hf_name == "lm_head.weight" and model.lm_head is None:
            continue  # tied: the embedding serves as lm_head
        if "rotary_emb" in hf_name:
            continue
        name, index = fused_target(hf_name)
        module_name, _, pname = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if module is None or pname not in module._parameters:
            raise ValueError(f"checkpoint has {hf_name!r}, which this {model.config.family} model lacks")
        if not isinstance(value, torch.Tensor):  # an NF4Weight: adopted in 4-bit
            if not isinstance(module, LoRALinear) or pname != "weight":
                raise ValueError(f"{hf_name} is 4-bit but only linear projections can be")
            module.set_quantized(index or 0, value if value.device == device else value.to(device))
        else:
            _load_dense(module, pname, index, value, dtype, device, hf_name)
        loaded.add((name, index))
    missing = [f"{n}[{i}]" if i is not None else n for n, i in _expected(model) - loaded]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")


def _load_dense(
    module: torch.nn.Module, pname: str, index: int | None, value: torch.Tensor,
    dtype: torch.dtype, device: torch.device, hf_name: str,
) -> None:
    param = module._parameters[pname]
    assert param is not None
    if index is None:
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"{hf_name}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}")
        module._parameters[pname] = torch.nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
        return
    assert isinstance(module, LoRALinear)
    if param.is_meta:
        param = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
        module._parameters[pname] = param
    sizes = module.out_slices
    start = sum(sizes[:index])
    target = param.data[start : start + sizes[index]]
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"{hf_name}: checkpoint shape {tuple(value.shape)} != model {tuple(target.shape)}")
    target.copy_(value)


def _expected(model: LlamaForCausalLM) -> set[tuple[str, int | None]]:
    expected: set[tuple[str, int | None]] = set()
    for module_name, module in model.named_modules():
        for pname, param in module._parameters.items():
            if param is None:
                continue
            name = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, LoRALinear) and len(module.out_slices) > 1:
                expected.update((name, i) for i in range(len(module.out_slices)))
            else:
                expected.add((name, None))
    return expected


def build_model(cfg: ModelConfig, named: Iterator[tuple[str, torch.Tensor | NF4Weight]],
                dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    load_weights(model, named, dtype, device)
    # Buffers built on the meta device hold nothing: recompute the rotary tables (kept in float32).
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope_cos_sin(inv_freq, cfg.max_position_embeddings)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model


def load_model(folder: str | Path, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Load full-precision safetensors directly (no Unsloth): the reference path for tests."""
    folder = Path(folder)
    return build_model(ModelConfig.from_folder(folder), iter_checkpoint(folder), dtype, device)
