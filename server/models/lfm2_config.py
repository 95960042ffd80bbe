"""config.json fields of LFM2 (Liquid AI's Lfm2ForCausalLM): gated short-convolution layers and
attention layers in the order `layer_types` (or `full_attn_idxs`) gives, with transformers' defaults
and its feed-forward width adjustment; and of LFM2-MoE (Lfm2MoeForCausalLM): the same layers with
sparse feed-forwards after the first `num_dense_layers`."""

from __future__ import annotations

from typing import Any

from .rope_config import parse_rope

CONV, ATTENTION = "conv", "full_attention"


def lfm2_ff_dim(cfg: dict[str, Any]) -> int:
    """The feed-forward width transformers builds: 2/3 of the configured one, times the multiplier,
    rounded up to `block_multiple_of`, when `block_auto_adjust_ff_dim` (LFM2's checkpoints set it)."""
    size = int(cfg.get("intermediate_size") or cfg.get("block_ff_dim") or 12288)
    if not cfg.get("block_auto_adjust_ff_dim", True):
        return size
    size = int(2 * size / 3)
    multiplier = cfg.get("block_ffn_dim_multiplier", 1.0)
    if multiplier is not None:
        multiple = int(cfg.get("block_multiple_of", 256))
        size = int(multiplier * size)
        size = multiple * ((size + multiple - 1) // multiple)
    return size


def lfm2_layer_types(cfg: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    kinds = cfg.get("layer_types")
    if kinds is None:
        attn = cfg.get("full_attn_idxs")
        attn = set(range(num_layers)) if attn is None else {int(i) for i in attn}
        kinds = [ATTENTION if i in attn else CONV for i in range(num_layers)]
    if not isinstance(kinds, list) or len(kinds) != num_layers or not set(kinds) <= {CONV, ATTENTION}:
        raise ValueError(f"config.json layer_types: expected {num_layers} entries, each {CONV!r} or {ATTENTION!r}; "
                         f"got {kinds!r:.120}")
    return tuple(kinds)


def lfm2_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    num_layers = int(cfg.get("num_hidden_layers", 32))
    num_heads = int(cfg.get("num_attention_heads", 32))
    hidden = int(cfg.get("hidden_size", 2560))
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    rope_theta, rope_scaling, max_positions = parse_rope({"rope_theta": 1e6, **cfg}, head_dim)
    return dict(
        family="lfm2", vocab_size=int(cfg.get("vocab_size", 65536)), hidden_size=hidden,
        intermediate_size=lfm2_ff_dim(cfg), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or 8), head_dim=head_dim,
        rms_norm_eps=float(cfg.get("norm_eps", 1e-5)), rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", cfg.get("tie_embedding", True))),
        qk_norm=True, torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        layer_types=lfm2_layer_types(cfg, num_layers), conv_kernel=int(cfg.get("conv_L_cache", 3)),
        conv_bias=bool(cfg.get("conv_bias", False)),
    )


def lfm2_moe_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """LFM2's fields, the dense layers' feed-forward as wide as configured (no adjustment), then the
    experts: a sigmoid router whose top-k picks add a per-expert bias (`use_expert_bias`), weights
    renormalized (`norm_topk_prob`) and scaled by `routed_scaling_factor` (server/models/lfm2.py)."""
    num_layers = int(cfg.get("num_hidden_layers", 32))
    num_experts = cfg.get("num_experts", 32)
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a whole number >= 1, got {num_experts!r}")
    top_k = cfg.get("num_experts_per_tok", 4)
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok must be between 1 and num_experts ({num_experts}), got {top_k!r}")
    dense = int(cfg.get("num_dense_layers", 2))
    if not 0 <= dense <= num_layers:
        raise ValueError(f"num_dense_layers must be between 0 and num_hidden_layers ({num_layers}), got {dense}")
    return dict(
        lfm2_fields({**cfg, "block_auto_adjust_ff_dim": False, "intermediate_size": cfg.get("intermediate_size", 7168)}),
        family="lfm2_moe", num_experts=num_experts, num_experts_per_tok=top_k,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 1792)), norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        mlp_only_layers=tuple(range(dense)), router_scoring="sigmoid", expert_bias=bool(cfg.get("use_expert_bias", True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
    )
