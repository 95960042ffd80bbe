"""Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) into the
per-projection A and scaled B matrices that the engine's LoRA slots hold."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from server.loader.adapter_modules import AdapterModules, read_adapter_modules
from server.models.weights import fused_target


@dataclass(slots=True)
class LoRAWeights:
    name: str
    path: str
    rank: int
    base_model: str | None
    # (our module name, slice index) -> (A [r, in], B * scale [out, r]), float32 on the host
    tensors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]
    # Tensors that are not LoRA factors (modules_to_save copies, trainable tokens), keys as saved
    full_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: AdapterModules | None = None  # those tensors sorted by module (server.loader.adapter_modules)


def read_adapter_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: adapter_config.json is missing")
    cfg = json.loads(path.read_text())
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"adapter {folder} is of PEFT type {peft_type}; only plain LoRA is supported")
    if cfg.get("use_dora"):
        raise ValueError(f"adapter {folder} is a DoRA adapter; only plain LoRA is supported")
    return cfg


MIN_SLOT_RANK = 16  # vLLM's default --max-lora-rank, and Unsloth's default adapter rank


def adapter_rank(cfg: dict) -> int:
    """The largest rank of an adapter's modules (its `r`, or larger ones in `rank_pattern`)."""
    pattern = cfg.get("rank_pattern") or {}
    return max([int(cfg["r"]), *(int(r) for r in pattern.values())])


def startup_lora_rank(folders: list[Path]) -> int:
    """The slot rank that fits every adapter folder given (at least MIN_SLOT_RANK). A folder that is not a
    readable adapter is passed over here: loading it later says what is wrong with it."""
    ranks = [MIN_SLOT_RANK]
    for folder in folders:
        try:
            ranks.append(adapter_rank(read_adapter_config(folder)))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return max(ranks)


def load_lora(name: str, folder: str | Path, max_rank: int) -> LoRAWeights:
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    rank = int(cfg["r"])
    widest = adapter_rank(cfg)
    if widest > max_rank:
        raise ValueError(f"adapter {name!r} has rank {widest} but the adapter slots hold rank {max_rank} "
                         f"(set at start-up from the adapters given then); restart with --max-lora-rank "
                         f"{widest} or more")
    alpha = float(cfg.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    weights_path = folder / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"adapter {name!r}: {weights_path} is missing")
    raw = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    full_tensors = {key: tensor for key, tensor in raw.items() if "lora_" not in key}
    for key, tensor in raw.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0]
                pairs.setdefault(module, {})[part] = tensor.float()
    tensors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter {name!r}: {module} lacks lora_A or lora_B")
        # PEFT prefixes "base_model.model."; what follows is the HF module path.
        hf_module = module.removeprefix("base_model.model.")
        ours, index = fused_target(hf_module + ".weight")
        tensors[(ours.removesuffix(".weight"), index or 0)] = (ab["lora_A"], ab["lora_B"] * scale)
    modules = read_adapter_modules(name, cfg, full_tensors)
    if not tensors and modules is None:
        raise ValueError(f"adapter {name!r} at {folder} holds no LoRA weights")
    return LoRAWeights(name, str(folder), rank, cfg.get("base_model_name_or_path"), tensors, full_tensors, modules)
