"""An adapter's adapter_config.json, read and checked without torch: every field that changes what
the LoRA computes is type-checked, and PEFT's rules say which modules it targets and with which
rank and alpha. What cannot be served exactly is refused, naming the field."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEFT_PREFIX = "base_model.model."  # what PEFT puts before the model's own module names on disk


class AdapterError(ValueError):
    """An adapter folder that cannot be served as it is; the message says which file and field, and
    what to do. A ValueError, so every caller that answers ValueError with a 400 does here too."""


class AdapterFileMissing(AdapterError, FileNotFoundError):
    """The folder lacks adapter_config.json or the weights file."""


# Fields whose set value makes the adapter compute something other than y += scale * B A x (or
# needs the base's weights changed first): refused, with what to do instead.
UNSERVED_FIELDS = {
    "use_dora": "a DoRA adapter (its magnitude vector rescales each output row of W + BA); merge it in PEFT "
                "(merge_and_unload) and serve the merged model, or train without use_dora",
    "lora_bias": "LoRA with a bias on lora_B; merge it in PEFT (merge_and_unload) and serve the merged model, "
                 "or train with lora_bias=False",
    "use_qalora": "a QA-LoRA adapter (pooled inputs); merge it in PEFT and serve the merged model",
    "alora_invocation_tokens": "an activated LoRA (aLoRA: active only after its invocation tokens), which "
                               "sloth-serve does not serve",
    "layer_replication": "an adapter on a model with replicated layers, which sloth-serve does not build",
    "use_bdlora": "a block-diagonal LoRA (BD-LoRA), which sloth-serve does not serve",
    "arrow_config": "an Arrow routing adapter, which sloth-serve does not serve",
    "kasa_config": "a KaSA adapter, which sloth-serve does not serve",
    "velora_config": "a VeLoRA adapter, which sloth-serve does not serve",
    "monteclora_config": "a MonteCLoRA adapter, which sloth-serve does not serve",
}
# init_lora_weights values that only set the starting A and B (the saved ones replace them).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
BIAS_VALUES = ("none", "all", "lora_only")


def _refuse(where: str, field: str, value: object, why: str) -> AdapterError:
    return AdapterError(f"{where}: {field}={json.dumps(value)} is {why}")


def _number(where: str, field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse(where, field, value, "not a finite number")
    return float(value)


def _field_number(where: str, cfg: dict[str, Any], field: str, default: float) -> float:
    value = cfg.get(field)
    return default if value is None else _number(where, field, value)


def _rank(where: str, field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(where, field, value, "not a rank: it must be a whole number >= 1")
    return value


def _flag(where: str, cfg: dict[str, Any], field: str) -> bool:
    value = cfg.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _refuse(where, field, value, "not true or false")
    return value


def _patterns(where: str, cfg: dict[str, Any], field: str) -> dict[str, Any]:
    value = cfg.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _refuse(where, field, value, "not an object of module pattern -> value")
    for key in value:
        try:
            re.compile(key)
        except re.error as exc:
            raise _refuse(where, field, value, f"not usable: {key!r} is not a regular expression ({exc})") from exc
    return value


def _names(where: str, cfg: dict[str, Any], field: str) -> str | tuple[str, ...] | None:
    """A module-name list or (PEFT's other spelling) one regular expression."""
    value = cfg.get(field)
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise _refuse(where, field, value, f"not a regular expression ({exc})") from exc
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _refuse(where, field, value, "neither a list of module names nor a regular expression")


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: str | tuple[str, ...] | None  # None: not recorded (then the tensors on disk decide)
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    bias: str
    base_model: str | None
    raw: dict[str, Any]  # the whole file (modules_to_save and trainable tokens are read from it)
    # PEFT's LoRA on parameters (`module.param`, matched on the name's end): MoE experts' 3-D weights.
    target_parameters: tuple[str, ...] = ()

    def rank_for(self, module: str) -> int:
        """The rank PEFT gives `module` (its name in the model, e.g. model.layers.0.self_attn.q_proj):
        the first rank_pattern key that matches the end of the name, else r."""
        key = _pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else float(self.alpha_pattern[key])

    def scale_for(self, module: str) -> float:
        """What B A x is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA (use_rslora)."""
        r = self.rank_for(module)
        return self.alpha_for(module) / (math.sqrt(r) if self.use_rslora else r)

    def targets_parameter(self, module: str, param: str) -> bool:
        """Whether target_parameters names `module`'s parameter `param`, as PEFT matches them
        (the whole name, or its end after a dot)."""
        key = f"{module}.{param}"
        return any(key == t or key.endswith("." + t) for t in self.target_parameters)

    def targets(self, module: str) -> bool:
        """Whether PEFT puts a LoRA on `module` under this config (target_modules, exclude_modules,
        layers_to_transform / layers_pattern), as peft.tuners.tuners_utils.check_target_module_exists."""
        excluded = self.exclude_modules
        if isinstance(excluded, str):
            if re.fullmatch(excluded, module):
                return False
        elif excluded and (module in excluded or any(module.endswith("." + e) for e in excluded)):
            return False
        targets = self.target_modules
        if targets is None:
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        if module in targets:
            return True
        if not any(module.endswith("." + t) for t in targets):
            return False
        if not self.layers_to_transform:
            return True
        index = _layer_index(module, self.layers_pattern)
        return index is not None and index in self.layers_to_transform


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # PEFT (peft.utils.other.get_pattern_key): the key is a regex for the name's last dotted parts.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _layer_index(module: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)  # the first numbered segment
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def parse_adapter_config(raw: object, where: str) -> AdapterConfig:
    """Check an adapter_config.json's content; `where` names the file in messages."""
    if not isinstance(raw, dict):
        raise AdapterError(f"{where} holds a JSON {type(raw).__name__}, not an object: "
                           "is it a PEFT adapter_config.json?")
    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterError(f"{where}: peft_type={json.dumps(peft_type)}: this is not a LoRA adapter (PEFT type "
                           f"{peft_type}); sloth-serve serves plain LoRA adapters only")
    if "r" not in raw:
        raise AdapterError(f"{where} has no `r` (the LoRA rank): is it complete? "
                           "Re-save it with PEFT's save_pretrained")
    for field, why in UNSERVED_FIELDS.items():
        value = raw.get(field)
        if value not in (None, False, {}, []):
            raise _refuse(where, field, value, why)
    init = raw.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise _refuse(where, "init_lora_weights", init,
                      "an initialisation that changes the base model's weights (or an unknown one); convert the "
                      "adapter to plain LoRA with PEFT (save_pretrained(path_initial_model_for_weight_conversion=...))")
    bias = raw.get("bias", "none") or "none"
    if bias not in BIAS_VALUES:
        raise _refuse(where, "bias", bias, f"not one of {', '.join(BIAS_VALUES)}")
    rank_pattern = {k: _rank(where, f"rank_pattern[{k!r}]", v)
                    for k, v in _patterns(where, raw, "rank_pattern").items()}
    alpha_pattern = {k: _number(where, f"alpha_pattern[{k!r}]", v)
                     for k, v in _patterns(where, raw, "alpha_pattern").items()}
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                    for i in layers)):
        raise _refuse(where, "layers_to_transform", layers, "not a layer index or a list of them")
    layers_pattern = _names(where, raw, "layers_pattern")
    target_modules = _names(where, raw, "target_modules")
    if isinstance(target_modules, str) and (layers or layers_pattern):
        raise AdapterError(f"{where}: layers_to_transform / layers_pattern cannot be used with a regular-expression "
                           "target_modules (PEFT refuses that too)")
    _field_number(where, raw, "lora_dropout", 0.0)  # training only, but a wrong type means a broken file
    _flag(where, raw, "fan_in_fan_out")  # PEFT turns it off for nn.Linear targets: nothing to do here
    base = raw.get("base_model_name_or_path")
    target_parameters = raw.get("target_parameters") or []
    if not (isinstance(target_parameters, list) and all(isinstance(t, str) and t for t in target_parameters)):
        raise _refuse(where, "target_parameters", target_parameters, "not a list of parameter names")
    if target_parameters and _field_number(where, raw, "lora_dropout", 0.0):
        raise _refuse(where, "lora_dropout", raw["lora_dropout"],
                      "not 0 with target_parameters, which PEFT does not train or apply either")
    return AdapterConfig(
        r=_rank(where, "r", raw["r"]),
        lora_alpha=_field_number(where, raw, "lora_alpha", 8.0),  # PEFT's LoraConfig default
        use_rslora=_flag(where, raw, "use_rslora"),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=target_modules,
        exclude_modules=_names(where, raw, "exclude_modules"),
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=(layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern,
        bias=bias,
        base_model=base if isinstance(base, str) else None,
        raw=raw,
        target_parameters=tuple(target_parameters),
    )


def read_adapter_config(folder: Path) -> AdapterConfig:
    path = folder / "adapter_config.json"
    if not path.is_file():
        if not folder.exists():
            raise AdapterFileMissing(f"{folder} does not exist")
        raise AdapterFileMissing(f"{folder} is not a PEFT adapter folder: adapter_config.json is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{folder.name}/adapter_config.json is not readable JSON ({exc}); "
                           "re-save the adapter with PEFT's save_pretrained") from exc
    return parse_adapter_config(raw, f"{folder.name}/adapter_config.json")
