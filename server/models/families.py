"""Which path serves a config.json's architecture: our own model code (native), the model's own
transformers modules inside our engine (generic), or none, with a one-line reason. Reads JSON and
transformers' source files only (no torch): the start-up checks run it before any weight is read."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .config import SUPPORTED_ARCHITECTURES
from .layernorm_config import generic_only
from .mistral3_config import PIXTRAL_ARCHITECTURES, text_refusal

# Families whose layers keep state beyond a KV cache (SSM, linear attention, gated convolutions).
RECURRENT_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "jamba", "rwkv", "qwen3_next", "qwen3_5", "qwen3_5_moe", "lfm2", "lfm2_moe",
    "lfm3", "granitemoehybrid", "falcon_h1", "bamba", "zamba", "zamba2", "nemotron_h", "recurrent_gemma", "xlstm",
    "kimi_linear", "olmo_hybrid", "bailing_hybrid", "minimax",
})
# config.json keys that only models with recurrent or linear-attention layers carry.
RECURRENT_KEYS = ("ssm_state_size", "mamba_d_state", "mamba_d_conv", "linear_num_value_heads", "linear_key_head_dim",
                  "hybrid_override_pattern", "layers_block_type", "attn_layer_indices", "full_attn_idxs",
                  "conv_L_cache", "layer_block_types")
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention"})
ALIBI_TYPES = frozenset({"bloom", "mpt", "jais"})
# Attention that transformers computes in a way the paged attention cannot, known by model type so that it is
# refused from config.json; the generic path's load-time checks (server/models/generic.py) would find each
# only after building the model (bench/family_sweep.py).
ATTENTION_REFUSALS = {
    "diffllama": ("its differential attention calls attention twice a layer (over two halves of its values) and "
                  "subtracts one result from the other, which sloth-serve's paged attention, one call a layer, "
                  "does not compute"),
    "doge": ("its dynamic mask attention adds a mask computed from its values to every attention score, which the "
             "paged attention cannot apply"),
}
SINKS = "it uses attention sinks, which the generic path's attention does not apply"
SINK_TYPES = frozenset({"gpt_oss", "granite_swa", "granitemoe_swa"})  # a learned sink logit on every layer
SLIDING_SINK_TYPES = frozenset({"mimo_v2_flash"})  # sinks on its sliding-window layers only
# Families whose sliding window transformers applies through its own mask or cache, never passing it to the
# attention call, so the paged attention would attend over the whole sequence.
WINDOW_OUTSIDE_ATTENTION = frozenset({"moshi"})
INTERFACE_CALL = "ALL_ATTENTION_FUNCTIONS.get_interface("


# Image-text models served with their vision encoder (server/models/vision.py): architecture -> model_type.
VISION_ARCHITECTURES = {"Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "Qwen2VLForConditionalGeneration": "qwen2_vl",
                        "Qwen3VLForConditionalGeneration": "qwen3_vl", "Qwen3VLMoeForConditionalGeneration": "qwen3_vl_moe",
                        "MllamaForConditionalGeneration": "mllama"}


@dataclass(frozen=True, slots=True)
class TextOnly:
    """A multimodal architecture whose text model alone runs on the generic path: images and audio
    are refused per request (the served model takes text only), the other towers' tensors stay on disk."""

    architecture: str  # the text model's causal LM
    model_type: str  # its model_type (config.json's text_config)
    text_prefix: str  # the checkpoint prefix of the text model's tensors (the causal LM's: "model.")
    other_towers: tuple[str, ...]  # checkpoint prefixes of the tensors left on disk


TEXT_ONLY_ARCHITECTURES = {
    "Gemma4ForConditionalGeneration": TextOnly("Gemma4ForCausalLM", "gemma4_text", "model.language_model.", (
        "model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")),
    "Gemma3nForConditionalGeneration": TextOnly("Gemma3nForCausalLM", "gemma3n_text", "model.language_model.", (
        "model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")),
}
# Model types whose modeling file lives in another model type's folder (where transformers' own table,
# read by _module_names, cannot be found).
MODULE_OF = {"gemma4_text": "gemma4", "gemma3n_text": "gemma3n"}


class UnsupportedModel(ValueError):
    """A model no path serves; the message is one line saying why."""


@dataclass(frozen=True, slots=True)
class Route:
    path: str  # "native", "generic" or "vision" (the generic path with an image encoder in the prefill)
    architecture: str
    model_type: str


def route_of(cfg: dict[str, Any]) -> Route:
    """The path that serves this config.json, or UnsupportedModel naming the reason."""
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    arch = str(archs[0] if isinstance(archs, list) else archs)
    model_type = str(cfg.get("model_type") or "")
    if arch in PIXTRAL_ARCHITECTURES and (reason := text_refusal(cfg)) is not None:
        raise UnsupportedModel(reason)
    if arch in SUPPORTED_ARCHITECTURES and generic_only(cfg, arch) is None:
        return Route("native", arch, model_type)
    if arch in VISION_ARCHITECTURES:
        return Route("vision", arch, model_type)
    text_only = TEXT_ONLY_ARCHITECTURES.get(arch)
    if text_only is not None:  # the text config's causal LM is what must run
        text_cfg = cfg.get("text_config")
        text_cfg = {**text_cfg, "architectures": [text_only.architecture]} if isinstance(text_cfg, dict) else {}
        reason = refusal(text_cfg, text_only.architecture, text_only.model_type)
    else:
        reason = refusal(cfg, arch, model_type)
    if reason is not None:
        raise UnsupportedModel(reason)
    return Route("generic", arch, model_type)


def refusal(cfg: dict[str, Any], arch: str, model_type: str) -> str | None:
    """Why the generic path cannot serve this model (None: it can)."""
    if cfg.get("is_encoder_decoder"):
        return "an encoder-decoder model; sloth-serve serves decoder-only causal language models"
    if model_type in RECURRENT_TYPES or any(k in cfg for k in RECURRENT_KEYS):
        return ("its layers keep recurrent or linear-attention state beyond a KV cache, which sloth-serve does not "
                "hold yet")
    if cfg.get("attention_chunk_size"):
        return "it uses chunked local attention, which sloth-serve's paged KV cache does not hold"
    layer_types = cfg.get("layer_types")
    other = sorted({str(t) for t in layer_types} - ATTENTION_LAYER_TYPES) if isinstance(layer_types, list) else []
    if other:
        return f"it has {', '.join(other)} layers (state beyond a KV cache), which sloth-serve does not hold yet"
    if not arch.endswith(("ForCausalLM", "LMHeadModel")):
        kind = "a multimodal model" if arch.endswith("ForConditionalGeneration") else "not a causal language model"
        return f"{kind}; sloth-serve serves decoder-only causal language models (...ForCausalLM)"
    if cfg.get("use_bidirectional_attention") == "all":
        return ("its tokens attend both ways (use_bidirectional_attention: all), which a causal paged KV cache "
                "does not compute")
    if cfg.get("prefix_lm") or "H_cycles" in cfg:
        return ("it runs its layers over the sequence several times (recurrent cycles) or attends both ways over "
                "the prompt (prefix LM), which a causal KV cache of one pass per layer cannot hold")
    if "patcher_config" in cfg or ("encoder_config" in cfg and "decoder_config" in cfg):
        return ("it reads bytes through a local encoder and decoder around its patches (cross-attention between "
                "stacks), which sloth-serve's one-stack causal engine does not run")
    if model_type in ALIBI_TYPES or cfg.get("alibi") or cfg.get("position_embedding_type") == "alibi":
        return "it uses ALiBi position biases, which sloth-serve's attention kernels do not apply"
    if (reason := attention_refusal(cfg, model_type)) is not None:
        return reason
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = (rope.get("rope_type") or rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in ("dynamic", "longrope"):
        return (f"its {rope_type} RoPE rescales by the longest sequence in a forward pass, which in a continuous "
                f"batch would change every other sequence's positions")
    return transformers_refusal(arch, model_type, "auto_map" in cfg)


def attention_refusal(cfg: dict[str, Any], model_type: str) -> str | None:
    """Why this family's attention, as transformers writes it, cannot run on the paged attention (None: it can)."""
    if model_type in ATTENTION_REFUSALS:
        return ATTENTION_REFUSALS[model_type]
    types = cfg.get("layer_types")
    sliding = "sliding_attention" in types if isinstance(types, list) else True  # the config classes' default
    if model_type in SINK_TYPES or (model_type in SLIDING_SINK_TYPES and sliding):
        return SINKS
    window, longest = cfg.get("sliding_window"), cfg.get("max_position_embeddings")
    if model_type in WINDOW_OUTSIDE_ATTENTION and isinstance(window, int) and not (
            isinstance(longest, int) and window >= longest):  # a window past the longest sequence never applies
        return (f"its sliding window ({window}) is applied by transformers' own mask or cache rather than passed to "
                "its attention, so the paged attention cannot apply it")
    return None


def transformers_refusal(arch: str, model_type: str, remote_code: bool) -> str | None:
    """Why transformers' implementation of `arch` cannot run on the generic path (None: it can)."""
    source = modeling_source(model_type)
    if source is None or f"class {arch}(" not in source:
        if remote_code:
            return "it needs its own Python code (trust_remote_code), which sloth-serve does not run"
        return f"transformers {transformers_version()} has no {arch} for model_type {model_type!r}"
    if INTERFACE_CALL not in source:
        return ("its transformers implementation computes attention itself rather than through AttentionInterface, "
                "so it cannot use sloth-serve's paged KV cache")
    return None


@cache
def modeling_source(model_type: str) -> str | None:
    """The text of transformers' modeling file for a model type, found without importing transformers."""
    root = _transformers_root()
    if root is None or not model_type:
        return None
    name = (_module_names(root).get(model_type) or MODULE_OF.get(model_type, model_type)).replace("-", "_")
    path = root / "models" / name / f"modeling_{name}.py"
    return path.read_text(encoding="utf-8") if path.is_file() else None


@cache
def _module_names(root: Path) -> dict[str, str]:
    """Model types whose code lives in another model's folder (aria_text in aria, gemma4_text in gemma4),
    as transformers' SPECIAL_MODEL_TYPE_TO_MODULE_NAME lists them, read from its source."""
    path = root / "models" / "auto" / "auto_mappings.py"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    start = text.find("SPECIAL_MODEL_TYPE_TO_MODULE_NAME = ")
    if start < 0:
        return {}
    block = text[start : text.find("\n)\n", start)]
    return dict(re.findall(r'\(\s*"([\w.-]+)",\s*"([\w.]+)"\s*\)', block))


def _transformers_root() -> Path | None:
    spec = importlib.util.find_spec("transformers")  # finds the package without running it
    locations = spec.submodule_search_locations if spec is not None else None
    return Path(next(iter(locations))) if locations else None


def transformers_version() -> str:
    root = _transformers_root()
    if root is None:
        return "(not installed)"
    for line in (root / "__init__.py").read_text(encoding="utf-8").splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "(unknown version)"


def supported_summary() -> str:
    """One line for error messages: the native families and what the generic path takes."""
    return (f"native: {', '.join(SUPPORTED_ARCHITECTURES)}; any other decoder-only causal LM that transformers "
            f"implements runs on the generic path; with images: {', '.join(VISION_ARCHITECTURES)}")
