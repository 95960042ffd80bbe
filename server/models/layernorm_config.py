"""Reads Cohere (`CohereForCausalLM`: Command-R, Aya) and StableLM (`StableLmForCausalLM`) config.json
files into ModelConfig's fields with transformers' defaults: LayerNorm rather than RMSNorm, parallel
attention and MLP (Cohere always, StableLM with `use_parallel_residual`), Cohere's interleaved RoPE in
float32 and logit scale, StableLM's partial rotary. Their q/k LayerNorms (`use_qk_norm`,
`qk_layernorm`) are not built natively: such configs take the generic path (`generic_only`)."""

from __future__ import annotations

from typing import Any

from .rope_config import parse_rope, partial_rotary_factor

# transformers 5.17's CohereConfig / StableLmConfig defaults (a key absent from config.json takes these).
_COHERE: dict[str, Any] = dict(
    vocab_size=256000,
    hidden_size=8192,
    intermediate_size=22528,
    logit_scale=0.0625,
    num_hidden_layers=40,
    num_attention_heads=64,
    hidden_act="silu",
    max_position_embeddings=8192,
    layer_norm_eps=1e-5,
    tie_word_embeddings=True,
    attention_bias=False,
    use_qk_norm=False,
)
_STABLELM: dict[str, Any] = dict(
    vocab_size=50304,
    intermediate_size=6912,
    hidden_size=2560,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    max_position_embeddings=4096,
    layer_norm_eps=1e-5,
    tie_word_embeddings=False,
    use_qkv_bias=False,
    qk_layernorm=False,
    use_parallel_residual=False,
    partial_rotary_factor=0.25,
)
# What sends a config of these architectures to the generic path instead: config key -> what it builds.
_GENERIC_WHEN = {
    "CohereForCausalLM": ("use_qk_norm", "q/k LayerNorms"),
    "StableLmForCausalLM": ("qk_layernorm", "per-head q/k LayerNorms"),
}


def generic_only(cfg: dict[str, Any], arch: str) -> str | None:
    """Why a config of a natively served architecture takes the generic path (None: it does not)."""
    key, what = _GENERIC_WHEN.get(arch, ("", ""))
    return f"{key} (its {what}) is served on the generic path" if key and cfg.get(key) else None


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def layernorm_fields(cfg: dict[str, Any], family: str) -> dict[str, Any]:
    """ModelConfig keyword arguments for a CohereForCausalLM / StableLmForCausalLM config.json."""
    cohere = family == "cohere"
    c = {**(_COHERE if cohere else _STABLELM), **{k: v for k, v in cfg.items() if v is not None}}
    if c["hidden_act"] != "silu":
        raise _fail("hidden_act", f"{c['hidden_act']!r} is not supported for {family} (only silu)")
    num_heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    head_dim = int(c.get("head_dim") or hidden // num_heads) if cohere else hidden // num_heads
    partial = 1.0 if cohere else partial_rotary_factor(c)
    theta, scaling, max_pos = parse_rope(c, head_dim, allow_partial=not cohere)
    if int(head_dim * partial) % 2:
        raise _fail(
            "partial_rotary_factor",
            f"{partial} x head_dim {head_dim} is an odd number of dims; RoPE rotates pairs",
        )
    bias = bool(c["attention_bias"] if cohere else c["use_qkv_bias"])
    return dict(
        family=family,
        vocab_size=int(c["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(c["layer_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        qkv_bias=bias,
        o_bias=bias and cohere,
        torch_dtype=str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
        partial_rotary_factor=partial,
        rope_interleaved=cohere,
        rope_fp32=cohere,
        norm_kind="layernorm_fp32" if cohere else "layernorm",
        parallel_residual=cohere or bool(c["use_parallel_residual"]),
        logit_scale=float(c["logit_scale"]) if cohere else 1.0,
    )
