"""Reads a gpt-oss config.json into ModelConfig's fields, with transformers' GptOssConfig defaults
for every key it omits: alternating sliding-window / full attention layers (`layer_types`), YaRN,
attention sinks and biases, and a mixture of experts with biased experts and router."""

from __future__ import annotations

from typing import Any

from .rope_config import parse_rope

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers 5.17's GptOssConfig defaults (openai/gpt-oss-20b's shapes).
_DEFAULTS: dict[str, Any] = dict(
    num_hidden_layers=36, num_local_experts=128, vocab_size=201088, hidden_size=2880, intermediate_size=2880,
    head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, num_experts_per_tok=4, attention_bias=True, tie_word_embeddings=False, rope_theta=150000.0,
)
_DEFAULT_ROPE: dict[str, Any] = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                     original_max_position_embeddings=4096)


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def gpt_oss_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments for a gpt-oss config.json."""
    t = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "sliding_window"}}
    if not (t.get("rope_scaling") or t.get("rope_parameters")):
        t["rope_parameters"] = dict(_DEFAULT_ROPE)
    num_layers, head_dim = int(t["num_hidden_layers"]), int(t["head_dim"])
    num_experts, top_k = t.get("num_experts", t["num_local_experts"]), t["num_experts_per_tok"]
    if not isinstance(num_experts, int) or num_experts < 1:
        raise _fail("num_local_experts", f"must be a whole number >= 1, got {num_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise _fail("num_experts_per_tok", f"must be between 1 and num_local_experts ({num_experts}), got {top_k!r}")
    layer_types = t.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
    if len(layer_types) != num_layers or set(layer_types) - {SLIDING, FULL}:
        raise _fail("layer_types", f"expected {num_layers} entries of {SLIDING!r} / {FULL!r}, got {layer_types!r:.120}")
    window = t.get("sliding_window")
    if SLIDING in layer_types and (not isinstance(window, int) or window < 1):
        raise _fail("sliding_window", f"sliding_attention layers need a whole number >= 1, got {window!r}")
    theta, scaling, max_positions = parse_rope(t, head_dim)
    num_heads = int(t["num_attention_heads"])
    return dict(
        family="gpt_oss", vocab_size=int(t["vocab_size"]), hidden_size=int(t["hidden_size"]),
        intermediate_size=int(t["intermediate_size"]), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(t.get("num_key_value_heads") or num_heads), head_dim=head_dim,
        rms_norm_eps=float(t["rms_norm_eps"]), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=max_positions, tie_word_embeddings=bool(t["tie_word_embeddings"]),
        qkv_bias=bool(t["attention_bias"]), o_bias=bool(t["attention_bias"]), attn_sinks=True,
        layer_windows=tuple(window if kind == SLIDING else None for kind in layer_types),
        torch_dtype=str(t.get("torch_dtype") or t.get("dtype") or "bfloat16"),
        num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=int(t["intermediate_size"]),
        swiglu_limit=float(t.get("swiglu_limit", 7.0)),
    )
