"""What an adapter's weights file holds, checked against its config before any tensor is used (no
torch): every key is a LoRA factor, or a whole-module tensor for the modules_to_save reader, or the
load stops naming it; A and B agree in rank with each other and with the config, in a float dtype."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .adapter_config import (
    PEFT_PREFIX,
    AdapterConfig,
    AdapterError,
    AdapterFileMissing,
    read_adapter_config,
)

SAFETENSORS, PICKLED = "adapter_model.safetensors", "adapter_model.bin"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names; torch dtypes are mapped to these
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True, slots=True)
class TensorSpec:
    dtype: str  # safetensors' spelling: F32, BF16, I64...
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoRAPair:
    module: str  # the module's name in the model: model.layers.0.self_attn.q_proj
    a_key: str  # the keys on disk
    b_key: str
    rank: int
    # LoRA on a parameter (PEFT's target_parameters): the names it may be (the model's shapes decide
    # which; an empty tuple: LoRA on a module). A is [rank * experts, in], B [out, rank * experts].
    parameters: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AdapterLayout:
    pairs: tuple[LoRAPair, ...]
    other_keys: tuple[str, ...]  # not LoRA factors: whole modules (modules_to_save, trainable tokens)

    @property
    def rank(self) -> int:
        """The widest rank among its modules (what an adapter slot must hold)."""
        return max((p.rank for p in self.pairs), default=0)


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Names, dtypes and shapes from a .safetensors header (8-byte length, then JSON), checked
    against the file's size so a truncated file is caught before it is loaded."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("it is too short to hold a header")
            (length,) = struct.unpack("<Q", head)
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError("its header length is out of range")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise AdapterError(f"{where(path)} is not a readable safetensors file ({exc}); save it again") from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{where(path)} is not a readable safetensors file (its header is not an object)")
    specs: dict[str, TensorSpec] = {}
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            spec = TensorSpec(str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
            ok = 0 <= start <= end <= data_size
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"{where(path)}: the entry of tensor {name!r} is malformed ({exc})") from exc
        if not ok:
            raise AdapterError(f"{where(path)}: tensor {name!r} lies past the end of the file (truncated?); save it again")
        specs[name] = spec
    return specs


def _lora_part(key: str) -> tuple[str, str] | None:
    """(module, 'A' or 'B') for a LoRA factor's key; None for a key that is no LoRA tensor at all."""
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _is_saved_module(key: str, cfg: AdapterConfig) -> bool:
    """A tensor of a module the adapter trains whole (modules_to_save), matched as PEFT matches."""
    names = cfg.raw.get("modules_to_save") or ()
    return any(isinstance(m, str) and re.match(rf"(^|.*\.){m}($|\..*)", key) for m in names)


def _refusal(key: str, cfg: AdapterConfig) -> str | None:
    """Why a non-factor tensor cannot be served, for the kinds we recognise; None for the rest."""
    if _is_saved_module(key.removeprefix(PEFT_PREFIX), cfg):
        return None
    if ".lora_magnitude_vector" in key:
        return f"{key} is a DoRA magnitude vector (use_dora), which sloth-serve does not serve"
    if ".lora_B.bias" in key:
        return (f"{key} is a bias on lora_B (lora_bias=true), which sloth-serve does not serve; merge the adapter "
                f"in PEFT (merge_and_unload) and serve the merged model")
    if ".lora_embedding_" in key:
        return (f"{key} is a LoRA on an embedding (embed_tokens in target_modules), which sloth-serve does not "
                f"serve; train the embedding with modules_to_save instead, or merge the adapter")
    if ".lora_" in key:
        return f"{key} is a LoRA tensor of a kind sloth-serve does not know (a PEFT LoRA variant?)"
    if key.endswith(".bias"):
        return (f"{key} is a trained base-layer bias (bias={json.dumps(cfg.bias)}), which sloth-serve does not "
                f"serve per adapter; train with bias='none', or merge the adapter and serve the merged model")
    return None


def plan_layout(cfg: AdapterConfig, specs: dict[str, TensorSpec], where: str) -> AdapterLayout:
    """Sort and check every tensor of the weights file `where`: nothing on disk goes unaccounted for."""
    factors: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key in specs:
        module_part = _lora_part(key)
        if module_part is None:
            why = _refusal(key, cfg)
            if why is not None:
                raise AdapterError(f"{where}: {why}")
            other.append(key)  # whole modules: the modules_to_save reader accounts for each
            continue
        module, part = module_part
        got = factors.setdefault(module.removeprefix(PEFT_PREFIX), {})
        if part in got:
            raise AdapterError(f"{where} holds lora_{part} of {module.removeprefix(PEFT_PREFIX)} twice "
                               f"({got[part]} and {key}); keep one")
        got[part] = key
    pairs = [_check_pair(cfg, module, keys, specs, where) for module, keys in factors.items()]
    if not pairs and not other:
        raise AdapterError(f"{where} holds no tensors: is it an adapter that was never trained or saved?")
    return AdapterLayout(tuple(pairs), tuple(other))


def _check_pair(cfg: AdapterConfig, module: str, keys: dict[str, str], specs: dict[str, TensorSpec],
                where: str) -> LoRAPair:
    if set(keys) != {"A", "B"}:
        lacks = "lora_B" if "A" in keys else "lora_A"
        raise AdapterError(f"{where}: {module} has {next(iter(keys.values()))} but no {lacks}; save the adapter again")
    a, b = specs[keys["A"]], specs[keys["B"]]
    for key, spec in ((keys["A"], a), (keys["B"], b)):
        if spec.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{where}: {key} is of dtype {spec.dtype}; LoRA weights must be floating point "
                               f"({', '.join(FLOAT_DTYPES)})")
        if len(spec.shape) != 2 or 0 in spec.shape:
            raise AdapterError(f"{where}: {key} has shape {list(spec.shape)}; a LoRA factor is a 2-D matrix")
    parameters = _wrapped_parameters(cfg, module)
    if parameters:
        return _parameter_pair(cfg, module, keys, (a, b), parameters, where)
    if not cfg.targets(module):
        raise AdapterError(f"{where} holds LoRA weights for {module}, which target_modules "
                           f"{json.dumps(cfg.raw.get('target_modules'))} does not select (PEFT would ignore them); "
                           f"fix adapter_config.json or save the adapter again")
    want = cfg.rank_for(module)
    rank_a, rank_b = a.shape[0], b.shape[1]
    if rank_a != rank_b:
        raise AdapterError(f"{where}: {module}'s lora_A has rank {rank_a} but its lora_B has rank {rank_b}; "
                           f"they must agree: save the adapter again")
    if rank_a != want:
        source = "rank_pattern" if want != cfg.r else "r"
        raise AdapterError(f"{where}: {module}'s LoRA has rank {rank_a} but adapter_config.json says {want} "
                           f"({source}); the config does not belong to these weights")
    return LoRAPair(module, keys["A"], keys["B"], rank_a)


def unwrapped(module: str) -> str:
    """The module PEFT's parameter wrappers (nested as `.base_layer`) sit on."""
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    return module


def _wrapped_parameters(cfg: AdapterConfig, module: str) -> tuple[str, ...]:
    """The parameters of `module` that target_parameters names. PEFT wraps each targeted parameter
    of a module in the wrapper of the one before (`experts.base_layer.lora_A` is the inner one):
    the wrapping order is not the names', so every candidate is kept for the shapes to decide."""
    base = unwrapped(module)
    names = [t.rpartition(".")[2] for t in cfg.target_parameters]
    return tuple(dict.fromkeys(p for p in names if cfg.targets_parameter(base, p)))


def _parameter_pair(cfg: AdapterConfig, module: str, keys: dict[str, str], specs: tuple[TensorSpec, TensorSpec],
                    parameters: tuple[str, ...], where: str) -> LoRAPair:
    """A target_parameters LoRA: one A and B for every expert at once (rank r per expert)."""
    base = unwrapped(module)
    width_a, width_b = specs[0].shape[0], specs[1].shape[1]
    if width_a != width_b:
        raise AdapterError(f"{where}: {keys['A']} has {width_a} rows but {keys['B']} has {width_b} columns; "
                           f"they must agree: save the adapter again")
    ranks = [cfg.rank_for(f"{base}.{p}") for p in parameters]
    rank = next((r for r in ranks if width_a % r == 0), None)
    if rank is None:
        raise AdapterError(f"{where}: {keys['A']} has {width_a} rows, not a multiple of the rank {ranks[0]} "
                           f"adapter_config.json gives {base}.{parameters[0]}; the config does not belong to "
                           f"these weights")
    return LoRAPair(base, keys["A"], keys["B"], rank, parameters)


def weights_file(folder: Path) -> Path:
    """adapter_model.safetensors, else the pickled adapter_model.bin PEFT writes with
    safe_serialization=False (the order PEFT itself reads them in)."""
    for name in (SAFETENSORS, PICKLED):
        if (folder / name).is_file():
            return folder / name
    raise AdapterFileMissing(f"{folder} has adapter_config.json but no {SAFETENSORS} (nor {PICKLED}): "
                             f"the adapter's weights were not saved there")


def check_adapter_folder(folder: Path) -> tuple[AdapterConfig, AdapterLayout | None]:
    """Everything about an adapter folder that can be checked without torch or the base model: its
    config, and the tensors' names, dtypes and ranks from the safetensors header (None for a .bin
    file, which only torch can read)."""
    cfg = read_adapter_config(folder)
    path = weights_file(folder)
    if path.name != SAFETENSORS:
        return cfg, None
    return cfg, plan_layout(cfg, read_safetensors_header(path), where(path))


def where(path: Path) -> str:
    """A file as messages name it: its folder's name and its own (an API client sees these, so not
    the server's directories)."""
    return f"{path.parent.name}/{path.name}"
