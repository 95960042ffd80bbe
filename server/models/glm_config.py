"""Reads a GLM / GLM-4 config.json (`GlmForCausalLM`, `Glm4ForCausalLM`) into ModelConfig's fields
with transformers' Glm(4)Config defaults: half of each head rotated (partial_rotary_factor 0.5) in
GPT-J's interleaved layout, q/k/v biases, and GLM-4's norms after attention and MLP."""

from __future__ import annotations

from typing import Any

from .rope_config import parse_rope, partial_rotary_factor

# transformers 5.17's GlmConfig / Glm4Config defaults (the two are the same).
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=151552,
    hidden_size=4096,
    intermediate_size=13696,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=0.00000015625,
    tie_word_embeddings=False,
    attention_bias=True,
    partial_rotary_factor=0.5,
)


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def glm_fields(cfg: dict[str, Any], family: str) -> dict[str, Any]:
    """ModelConfig keyword arguments for a GlmForCausalLM / Glm4ForCausalLM config.json."""
    c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if c["hidden_act"] != "silu":
        raise _fail(
            "hidden_act",
            f"{c['hidden_act']!r} is not supported for {family} (only silu, what every GLM checkpoint uses)",
        )
    num_heads = int(c["num_attention_heads"])
    head_dim = int(c["head_dim"])
    theta, scaling, max_pos = parse_rope(c, head_dim, allow_partial=True)
    partial = partial_rotary_factor(c)
    if int(head_dim * partial) % 2:
        raise _fail(
            "partial_rotary_factor",
            f"{partial} x head_dim {head_dim} is an odd number of dims; RoPE rotates pairs",
        )
    return dict(
        family=family,
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(c["num_key_value_heads"] or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        qkv_bias=bool(c["attention_bias"]),
        torch_dtype=str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
        partial_rotary_factor=partial,
        rope_interleaved=True,
        post_norms=family == "glm4",
    )
