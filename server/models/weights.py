"""Fill our model from a Hugging Face checkpoint folder (safetensors), fusing q|k|v and gate|up."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kernels.rope import rope_cos_sin, rope_inv_freq
from server.models.config import ModelConfig
from server.models.layers import LoRALinear
from server.models.llama import LlamaForCausalLM

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


def load_weights(model: LlamaForCausalLM, named: Iterator[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for hf_name, tensor in named:
        if hf_name == "lm_head.weight" and model.lm_head is None:
            continue  # tied: the embedding serves as lm_head
        if "rotary_emb" in hf_name:
            continue
        name, index = fused_target(hf_name)
        if name not in params:
            raise ValueError(f"checkpoint has {hf_name!r}, which this {model.config.family} model lacks")
        param = params[name]
        if index is None:
            target = param.data
        else:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            assert isinstance(module, LoRALinear)
            sizes = module.out_slices
            start = sum(sizes[:index])
            target = param.data[start : start + sizes[index]]
        if target.shape != tensor.shape:
            raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
        target.copy_(tensor)
        loaded.add(f"{name}:{index}")
    expected = {f"{n}:{i}" for n, p in params.items() for i in _slices(model, n)}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _slices(model: LlamaForCausalLM, name: str) -> list[int | None]:
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    if isinstance(module, LoRALinear) and name.endswith(".weight") and len(module.out_slices) > 1:
        return list(range(len(module.out_slices)))
    if name.endswith(".bias") and "qkv_proj" in name:
        return [0, 1, 2]
    return [None]


def load_model(folder: str | Path, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    folder = Path(folder)
    cfg = ModelConfig.from_folder(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    # Buffers built on the meta device hold nothing: recompute the rotary tables (kept in float32).
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope_cos_sin(inv_freq, cfg.max_position_embeddings)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    load_weights(model, iter_checkpoint(folder))
    return model
