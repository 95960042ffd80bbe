"""Reads an EXAONE 4.0 config.json (`Exaone4ForCausalLM`) into ModelConfig's fields with transformers'
Exaone4Config defaults: q/k RMSNorm per head, sliding-window and global layers (`layer_types`, else
every `sliding_window_pattern`-th layer global), RoPE on the sliding layers only (global NoPE) when
there is a window, and RMSNorms after attention and MLP instead of before (server/models/exaone4.py)."""

from __future__ import annotations

from typing import Any

from .rope_config import parse_rope

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers 5.17's Exaone4Config defaults (a key absent from config.json takes these).
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=102400,
    hidden_size=4096,
    intermediate_size=16384,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    sliding_window=4096,
    sliding_window_pattern=4,
)


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def _layer_types(c: dict[str, Any], num_layers: int) -> list[str]:
    if c.get("layer_types"):
        return list(c["layer_types"])
    if c.get("sliding_window") is None:
        return [FULL] * num_layers
    pattern = c.get("sliding_window_pattern")
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
        raise _fail(
            "sliding_window_pattern", f"{pattern!r} without layer_types: expected a whole number >= 1"
        )
    return [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]


def exaone4_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments for an Exaone4ForCausalLM config.json."""
    c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "sliding_window"}}
    if c["hidden_act"] != "silu":
        raise _fail("hidden_act", f"{c['hidden_act']!r} is not supported for exaone4 (only silu)")
    num_layers, num_heads = int(c["num_hidden_layers"]), int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // num_heads)
    kinds = _layer_types(c, num_layers)
    if len(kinds) != num_layers or set(kinds) - {SLIDING, FULL}:
        raise _fail(
            "layer_types", f"expected {num_layers} entries of {SLIDING!r} / {FULL!r}, got {kinds!r:.120}"
        )
    window = c.get("sliding_window")
    if SLIDING in kinds and (not isinstance(window, int) or window < 1):
        raise _fail("sliding_window", f"sliding_attention layers need a whole number >= 1, got {window!r}")
    theta, scaling, max_pos = parse_rope(c, head_dim)
    return dict(
        family="exaone4",
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        qk_norm=True,
        torch_dtype=str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
        layer_windows=tuple(window if kind == SLIDING else None for kind in kinds),
        # transformers rotates every layer without a window, else the sliding layers only
        rope_layers=tuple(window is None or kind == SLIDING for kind in kinds),
    )
