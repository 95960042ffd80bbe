"""Load a model folder into our own model: weights, stop tokens and the tokenizer's location."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from server.models.llama import LlamaForCausalLM
from server.models.weights import load_model


@dataclass(slots=True)
class LoadedModel:
    model: LlamaForCausalLM
    folder: Path
    eos_token_ids: frozenset[int]


def read_eos_token_ids(folder: Path) -> frozenset[int]:
    """EOS ids from generation_config.json (what `generate` stops on), else config.json."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text()).get("eos_token_id")
        if value is None:
            continue
        ids.update(value if isinstance(value, list) else [value])
        break
    return frozenset(int(i) for i in ids)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_checkpoint(folder: str | Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    model = load_model(folder, dtype, device)
    return LoadedModel(model, folder, read_eos_token_ids(folder))
