"""Reads a Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini config.json (`Phi3ForCausalLM`) into ModelConfig's
fields as transformers' Phi3Config resolves it: its defaults, partial rotary, longrope (`su` and
`yarn` are its old names there), and the sliding window, which transformers applies whenever set."""

from __future__ import annotations

import logging
from typing import Any

from .rope_config import parse_rope, partial_rotary_factor

logger = logging.getLogger(__name__)
_warned: set[str] = set()

# transformers' Phi3Config defaults (a key absent from config.json takes these).
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    hidden_act="silu", max_position_embeddings=4096, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False, sliding_window=None,
)


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def phi3_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments for a Phi3ForCausalLM config.json."""
    c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "sliding_window"}}
    if c["hidden_act"] != "silu":
        raise _fail("hidden_act", f"{c['hidden_act']!r} is not supported for Phi-3 (only silu, what every "
                    "Phi-3 / Phi-4 checkpoint uses)")
    num_heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // num_heads)
    theta, scaling, max_pos = parse_rope(_phi3_rope(c), head_dim, allow_partial=True)
    partial = partial_rotary_factor(c)
    if int(head_dim * partial) % 2:
        raise _fail("partial_rotary_factor", f"{partial} x head_dim {head_dim} is an odd number of dims; "
                    "RoPE rotates pairs")
    if scaling is not None and scaling["rope_type"] == "longrope":
        _warn_once(_LONGROPE_NOTE.format(orig=scaling["original_max_position_embeddings"]))
    window = c.get("sliding_window")
    return dict(
        family="phi3",
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        # transformers' Phi3 attention masks with the window whenever config.json sets one
        sliding_window=int(window) if window else None,
        torch_dtype=str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
        partial_rotary_factor=partial,
    )


_LONGROPE_NOTE = (
    "Phi-3 longrope: a sequence whose prompt fits the original {orig} positions but which decodes past them "
    "keeps its earlier keys rotated with the short factors (the paged cache keeps keys as first rotated); "
    "transformers' Phi-3 recomputes the whole sequence with the long factors at that point. A prompt longer "
    "than {orig} is rotated with the long factors throughout, as transformers does"
)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _phi3_rope(c: dict[str, Any]) -> dict[str, Any]:
    """The config with its rope dict as Phi3Config reads it: `su` and `yarn` mean longrope, only
    default and longrope load at all, and the top-level original_max_position_embeddings (4096 when
    absent) takes priority over the dict's."""
    raw = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(raw, dict):
        raise _fail("rope_scaling", f"expected an object, got {raw!r:.80}")
    rope_type = raw.get("rope_type", raw.get("type", "default")) or "default"
    if rope_type in ("su", "yarn"):
        rope_type = "longrope"
    if rope_type not in ("default", "longrope"):
        raise _fail("rope_scaling.rope_type", f"{rope_type!r} is not a Phi-3 RoPE type (transformers' Phi3Config "
                    "accepts default and longrope only)")
    raw = {**{k: v for k, v in raw.items() if k != "type"}, "rope_type": rope_type}
    return {**c, "rope_scaling": raw, "rope_parameters": None}
