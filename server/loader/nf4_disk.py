"""bitsandbytes 4-bit weights read straight from a folder's safetensors files: each packed `weight`
with its serialized quantization state (`absmax`, `quant_map`, `nested_*`, `quant_state.bitsandbytes__*`)
becomes one NF4Weight, bytes unchanged. Used for `--load-format safetensors` on a pre-quantized folder,
and for the MoE experts that transformers 5 cannot load in 4-bit: Unsloth's `-bnb-4bit` MoE uploads
(written by transformers 4) keep one 4-bit linear per expert, and transformers 5 merges their packed
bytes into its 3-D experts and drops their quantization state."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from sloth_kernels.nf4_format import NF4Weight

from ..models.moe import expert_weight_names

_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_STATE = ".quant_state.bitsandbytes__"


def is_bnb_4bit(config: dict[str, Any]) -> bool:
    """A config.json whose quantization_config is bitsandbytes 4-bit (what this module reads)."""
    quant = config.get("quantization_config")
    return (isinstance(quant, dict) and quant.get("quant_method") == "bitsandbytes"
            and bool(quant.get("load_in_4bit")))


def _split(key: str) -> tuple[str, str] | None:
    """(weight name, part) for a quantization-state tensor's name; None for anything else."""
    base, sep, part = key.rpartition(".weight.")
    if not sep:
        return None
    if part in _PARTS or part.startswith(_STATE[1:]):
        return f"{base}.weight", part
    return None


def _complete(parts: dict[str, torch.Tensor]) -> bool:
    state = next((v for k, v in parts.items() if k.startswith(_STATE[1:])), None)
    if "weight" not in parts or state is None or not {"absmax", "quant_map"} <= parts.keys():
        return False
    from bitsandbytes.utils import unpack_tensor_to_dict

    nested = "nested_blocksize" in unpack_tensor_to_dict(state)
    return not nested or {"nested_absmax", "nested_quant_map"} <= parts.keys()


def _nf4(name: str, parts: dict[str, torch.Tensor]) -> NF4Weight:
    from bitsandbytes.functional import QuantState

    packed = parts.pop("weight")
    try:
        state = QuantState.from_dict(parts, device=packed.device)
        return NF4Weight.from_bnb(packed, state)
    except (ValueError, KeyError, AssertionError) as e:
        raise ValueError(f"{name}: its bitsandbytes 4-bit quantization state does not read ({e})") from e


def grouped_4bit(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor | NF4Weight]]:
    """Checkpoint tensors with each 4-bit weight and its quantization-state tensors joined into one
    NF4Weight (its parts may come later, from another shard); every other tensor as it is. A packed
    weight whose state never arrives is passed on as the uint8 tensor it is (the loader refuses it)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in named:
        split = _split(key)
        if split is None and not (key.endswith(".weight") and value.dtype == torch.uint8):
            yield key, value
            continue
        name, part = split or (key, "weight")
        parts = pending.setdefault(name, {})
        parts[part] = value
        if _complete(parts):
            yield name, _nf4(name, pending.pop(name))
    for name, parts in pending.items():
        if "weight" not in parts:
            raise ValueError(f"{name}: the checkpoint has its 4-bit quantization state ({sorted(parts)}) but "
                             f"not the weight")
        state = sorted(p for p in parts if p != "weight")
        if state:
            raise ValueError(f"{name}: its 4-bit quantization state is incomplete on disk (has {state})")
        yield name, parts["weight"]


def _disk_4bit_names(folder: Path) -> list[str]:
    """Names of the weights stored in bitsandbytes 4-bit (their quantization state beside them)."""
    from safetensors import safe_open

    names: list[str] = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names += [key.partition(_STATE)[0] for key in f.keys() if _STATE in key]  # noqa: SIM118
    return names


def _disk_tensors(folder: Path, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in names or (_split(key) or ("",))[0] in names:
                    yield key, f.get_tensor(key)


def with_4bit_from_disk(folder: Path, named: Iterator[tuple[str, torch.Tensor | NF4Weight]],
                        num_experts: int) -> Iterator[tuple[str, torch.Tensor | NF4Weight]]:
    """The weights of a transformers-loaded model, except that 4-bit weights on disk which it did not
    load in 4-bit are read from disk as NF4, and what it holds in their place is dropped: experts
    stored per expert (transformers 5 merges their packed bytes into uint8 3-D tensors without their
    quantization state) and a 4-bit router (a plain parameter in transformers 5, not a linear layer).
    Names compare per expert (`expert_weight_names`). Models without experts: the weights unchanged."""
    on_disk = _disk_4bit_names(folder) if num_experts else []
    if not on_disk:
        yield from named
        return
    items = list(named)  # references to the loaded tensors, not copies
    in_4bit = {n for name, v in items if isinstance(v, NF4Weight) for n in expert_weight_names(name, num_experts)}
    from_disk = [name for name in on_disk if not expert_weight_names(name, num_experts) <= in_4bit]
    covered = {n for name in from_disk for n in expert_weight_names(name, num_experts)}
    for name, value in items:
        if isinstance(value, torch.Tensor) and covered and expert_weight_names(name, num_experts) <= covered:
            continue  # transformers' stand-in for a 4-bit weight it could not load as such: read below
        yield name, value
    yield from grouped_4bit(_disk_tensors(folder, set(from_disk)))
