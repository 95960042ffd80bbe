"""Reads a Gemma 2 / Gemma 3 config.json (a text model, or the text_config of Gemma 3's image-text
checkpoints) into ModelConfig's fields, with transformers' defaults for every key it omits (the
published Gemma 3 configs leave most of them out)."""

from __future__ import annotations

import logging
from typing import Any

from .rope_config import parse_rope

logger = logging.getLogger(__name__)

GEMMA_FAMILIES = ("gemma2", "gemma3")
MULTIMODAL_ARCHITECTURES = ("Gemma3ForConditionalGeneration",)
SLIDING, FULL = "sliding_attention", "full_attention"

# transformers' Gemma2Config / Gemma3TextConfig defaults (a key absent from config.json takes these).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rope_theta=10000.0),
    "gemma3": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=1_000_000.0,
                   rope_local_base_freq=10000.0, sliding_window_pattern=6),
}
_warned: set[str] = set()


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def gemma_fields(cfg: dict[str, Any], family: str, arch: str) -> dict[str, Any]:
    """ModelConfig keyword arguments for a Gemma 2 / 3 config.json."""
    multimodal = arch in MULTIMODAL_ARCHITECTURES
    text = cfg.get("text_config") if multimodal else cfg
    if not isinstance(text, dict):
        raise _fail("text_config", f"{arch} needs the text model's config as an object, got {text!r:.80}")
    t = {**_DEFAULTS[family], **text}
    if t.get("use_bidirectional_attention"):
        raise _fail("use_bidirectional_attention", "true (an embedding model attending both ways) is not a "
                    "causal language model; sloth-serve generates text with causal models only")
    act = t.get("hidden_activation") or t.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise _fail("hidden_activation", f"{act!r} is not supported for {family} (only gelu_pytorch_tanh, "
                    "what every Gemma 2 / 3 checkpoint uses)")
    num_layers, head_dim = int(t["num_hidden_layers"]), int(t["head_dim"])
    layer_types = _layer_types(t, family, num_layers)
    window = t.get("sliding_window")
    theta, scaling, max_pos, local_theta, local_scaling = _rope(t, family, head_dim)
    attn_softcap, final_softcap = t.get("attn_logit_softcapping"), t.get("final_logit_softcapping")
    if family == "gemma3" and attn_softcap is not None:
        _warn_once(f"{arch}: attn_logit_softcapping {attn_softcap} is not applied (transformers' Gemma 3 "
                   "attention does not apply it either)")
        attn_softcap = None
    if multimodal and final_softcap is not None:
        _warn_once(f"{arch}: final_logit_softcapping {final_softcap} is not applied (transformers' "
                   "Gemma3ForConditionalGeneration does not apply it either)")
        final_softcap = None
    tie = cfg.get("tie_word_embeddings", True) if multimodal else t["tie_word_embeddings"]
    return dict(
        family=family,
        vocab_size=int(t["vocab_size"]),
        hidden_size=int(t["hidden_size"]),
        intermediate_size=int(t["intermediate_size"]),
        num_layers=num_layers,
        num_heads=int(t["num_attention_heads"]),
        num_kv_heads=int(t.get("num_key_value_heads") or t["num_attention_heads"]),
        head_dim=head_dim,
        rms_norm_eps=float(t["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(tie),
        qkv_bias=bool(t.get("attention_bias", False)),
        qk_norm=family == "gemma3",
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or t.get("torch_dtype") or t.get("dtype")
                        or "bfloat16"),
        layer_windows=tuple(int(window) if kind == SLIDING and window else None for kind in layer_types),
        attn_scale=float(t["query_pre_attn_scalar"]) ** -0.5,
        attn_softcap=float(attn_softcap) if attn_softcap is not None else None,
        final_softcap=float(final_softcap) if final_softcap is not None else None,
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
        multimodal=multimodal,
        **_vision_fields(cfg, multimodal),
    )


def _vision_fields(cfg: dict[str, Any], multimodal: bool) -> dict[str, Any]:
    """Gemma 3's image-text checkpoints: the vision tower's config and the image token's facts, with
    transformers' Gemma3Config defaults for what config.json leaves out."""
    vision = cfg.get("vision_config") if multimodal else None
    if vision is None:
        return {}
    if not isinstance(vision, dict):
        raise _fail("vision_config", f"expected the SigLIP vision tower's config as an object, got {vision!r:.80}")
    tokens = int(cfg.get("mm_tokens_per_image") or 256)
    image_size, patch_size = int(vision.get("image_size", 224)), int(vision.get("patch_size", 16))
    patches, side = image_size // patch_size, round(tokens**0.5)
    if side * side != tokens or side < 1 or patches % side:
        raise _fail("mm_tokens_per_image", f"{tokens} is not a square whose side divides the vision tower's "
                    f"{patches}x{patches} patches (image_size {image_size} / patch_size {patch_size})")
    image_token = cfg.get("image_token_id", cfg.get("image_token_index", 262_144))
    return dict(vision_config=dict(vision), image_token_id=int(image_token), mm_tokens_per_image=tokens)


def _layer_types(t: dict[str, Any], family: str, num_layers: int) -> list[str]:
    """Each layer's kind: config.json's layer_types, else transformers' default pattern (Gemma 2:
    every other layer local from the first; Gemma 3: every sliding_window_pattern-th layer global)."""
    kinds = t.get("layer_types")
    if kinds is None:
        if family == "gemma2":
            return [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
        pattern = int(t.get("_sliding_window_pattern") or t.get("sliding_window_pattern") or 6)
        return [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if not isinstance(kinds, list) or len(kinds) != num_layers or not set(kinds) <= {SLIDING, FULL}:
        raise _fail("layer_types", f"expected {num_layers} entries, each {SLIDING!r} or {FULL!r}; got {kinds!r:.120}")
    return list(kinds)


def _rope(t: dict[str, Any], family: str, head_dim: int
          ) -> tuple[float, dict[str, Any] | None, int, float | None, dict[str, Any] | None]:
    """(theta, scaling, positions) of the global layers and (theta, scaling) of the local ones (None:
    the global tables). Gemma 3: transformers 5's rope_parameters per layer type, or the older keys
    (rope_theta / rope_scaling for global layers, rope_local_base_freq for local ones)."""
    params = t.get("rope_parameters")
    per_type = isinstance(params, dict) and (FULL in params or SLIDING in params)
    if family == "gemma2" and not per_type:
        theta, scaling, max_pos = parse_rope(t, head_dim)
        _no_longrope(scaling)
        return theta, scaling, max_pos, None, None
    if per_type:
        assert isinstance(params, dict)
        full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    else:
        full, local = dict(params or {}), {}
    if isinstance(t.get("rope_scaling"), dict):  # transformers applies a legacy rope_scaling to global layers
        full.update(t["rope_scaling"])
    full.setdefault("rope_theta", t.get("rope_theta") or _DEFAULTS[family]["rope_theta"])
    local.setdefault("rope_theta", t.get("rope_local_base_freq") or _DEFAULTS["gemma3"]["rope_local_base_freq"])
    theta, scaling, max_pos = parse_rope({**t, "rope_scaling": full, "rope_parameters": None}, head_dim)
    local_theta, local_scaling, _ = parse_rope({**t, "rope_scaling": local, "rope_parameters": None}, head_dim)
    _no_longrope(scaling)
    _no_longrope(local_scaling)
    return theta, scaling, max_pos, local_theta, local_scaling


def _no_longrope(scaling: dict[str, Any] | None) -> None:
    if scaling is not None and scaling["rope_type"] == "longrope":
        raise _fail("rope_parameters.rope_type", "longrope on a Gemma model is not supported (its per-prompt "
                    "choice of factors is served for Llama-family models only)")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
