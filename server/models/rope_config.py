"""Reads a config.json's RoPE settings (`rope_scaling`, or transformers 5 `rope_parameters`) into one
normalized dict with every default resolved as transformers resolves it; refuses what we cannot compute."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")
_warned: set[str] = set()


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def _number(d: dict[str, Any], key: str, rope_type: str) -> float:
    value = d.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise _fail(f"rope_scaling.{key}", f"rope type {rope_type!r} needs a positive number, got {value!r}")
    return float(value)


def partial_rotary_factor(cfg: dict[str, Any]) -> float:
    """The share of each head RoPE rotates (transformers reads it from the rope dict first)."""
    raw = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    partial = (raw if isinstance(raw, dict) else {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is None:
        return 1.0
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise _fail("partial_rotary_factor", f"expected a number in (0, 1], got {partial!r}")
    return float(partial)


def parse_rope(
    cfg: dict[str, Any], head_dim: int, allow_partial: bool = False
) -> tuple[float, dict[str, Any] | None, int]:
    """(rope_theta, normalized scaling or None, the number of positions to serve). The scaling dict
    always holds `rope_type` and, for every type that uses it, `factor` and
    `original_max_position_embeddings` (for dynamic: the length past which transformers rescales).
    `allow_partial`: the family rotates int(head_dim x partial_rotary_factor) dims (Phi-3); other
    families refuse a factor below 1."""
    max_pos = int(cfg.get("max_position_embeddings") or 2048)
    # transformers: `rope_scaling` takes precedence; theta in the dict over the top-level key.
    raw = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(raw, dict):
        raise _fail("rope_scaling", f"expected an object, got {raw!r}")
    theta = float(raw.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    rope_type = raw.get("rope_type", raw.get("type", "default")) or "default"
    if rope_type == "su":  # the name early Phi-3 configs gave longrope (transformers' Phi3Config maps it)
        rope_type = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _fail("rope_scaling.rope_type", f"{rope_type!r} is not supported (supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}); this server cannot serve this model exactly")
    partial = partial_rotary_factor(cfg)
    if partial != 1.0 and not allow_partial:
        raise _fail("partial_rotary_factor", f"{partial} (RoPE on part of each head) is not supported for this "
                    "architecture; only models that rotate the whole head can be served")
    rotary_dim = int(head_dim * partial)  # the rotated dims, which the frequencies span
    if rope_type == "default":
        return theta, None, max_pos
    s: dict[str, Any] = {"rope_type": rope_type}
    # transformers gives a top-level `original_max_position_embeddings` priority (Phi-3 keeps it there).
    orig = cfg.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings") or max_pos
    s["original_max_position_embeddings"] = int(orig)
    if rope_type in ("yarn", "longrope"):
        s["factor"] = float(raw["factor"]) if raw.get("factor") is not None else max_pos / int(orig)
    else:
        s["factor"] = _number(raw, "factor", rope_type)
    if rope_type == "llama3":
        s["low_freq_factor"] = _number(raw, "low_freq_factor", rope_type)
        s["high_freq_factor"] = _number(raw, "high_freq_factor", rope_type)
    elif rope_type == "yarn":
        s.update(beta_fast=float(raw.get("beta_fast") or 32), beta_slow=float(raw.get("beta_slow") or 1),
                 truncate=bool(raw.get("truncate", True)), mscale=raw.get("mscale"),
                 mscale_all_dim=raw.get("mscale_all_dim"), attention_factor=raw.get("attention_factor"))
        # YaRN's frequencies do not depend on the position: serve the context it was scaled to.
        max_pos = max(max_pos, int(s["original_max_position_embeddings"] * s["factor"]))
    elif rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = raw.get(key)
            if not isinstance(factors, list) or len(factors) != rotary_dim // 2:
                raise _fail(f"rope_scaling.{key}", f"longrope needs a list of {rotary_dim // 2} numbers "
                            f"(the rotary dims / 2), got {factors!r:.80}")
            s[key] = [float(x) for x in factors]
        s["attention_factor"] = raw.get("attention_factor")
    elif rope_type == "dynamic":
        s["original_max_position_embeddings"] = max_pos  # transformers rescales past max_position_embeddings
        max_pos = int(max_pos * s["factor"])
        _warn_once(
            f"rope_scaling dynamic: positions past {s['original_max_position_embeddings']} are rotated as "
            "transformers rotates a token decoded there (the NTK base for that length), but a prompt "
            "longer than that is rotated position by position where transformers uses the base for the "
            "whole prompt's length; pass --max-model-len "
            f"{s['original_max_position_embeddings']} to serve only what equals transformers"
        )
    return theta, s, max_pos


def attn_temperature(cfg: dict[str, Any]) -> tuple[float, int]:
    """Ministral 3's query scale (Llama 4's attention temperature): (beta, length), a query at
    position p multiplied by 1 + beta * log(1 + floor(p / length)), from the rope dict's
    `llama_4_scaling_beta` and `original_max_position_embeddings` (transformers reads both there)."""
    raw = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    raw = raw if isinstance(raw, dict) else {}
    beta, length = raw.get("llama_4_scaling_beta"), raw.get("original_max_position_embeddings")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or beta < 0:
        raise _fail("rope_parameters.llama_4_scaling_beta", f"Ministral 3 scales its queries by it; expected a "
                    f"number >= 0, got {beta!r}")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise _fail("rope_parameters.original_max_position_embeddings", f"Ministral 3's query scale grows every "
                    f"this many positions; expected a positive integer, got {length!r}")
    return float(beta), length


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
