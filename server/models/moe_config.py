"""config.json fields of the mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral), with
transformers' defaults where a config leaves one out."""

from __future__ import annotations

from typing import Any

MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")


def moe_fields(cfg: dict[str, Any], family: str) -> dict[str, Any]:
    """The ModelConfig fields that make layers sparse ({} for a dense family). Mixtral's experts
    are `intermediate_size` wide and every layer is sparse; the Qwen families name the expert width
    `moe_intermediate_size` and may keep dense layers (`mlp_only_layers`, `decoder_sparse_step`)."""
    if family not in MOE_FAMILIES:
        return {}
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a whole number >= 1, got {num_experts!r}")
    top_k = cfg.get("num_experts_per_tok", 2)
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok must be between 1 and num_experts ({num_experts}), got {top_k!r}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported for {family} experts (silu only)")
    if family == "mixtral":
        return dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=cfg["intermediate_size"],
                    norm_topk_prob=True, router_weights_fp32=True)
    step = cfg.get("decoder_sparse_step") or 1
    return dict(
        num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=cfg["moe_intermediate_size"],
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 5632))  # always one in Qwen2-MoE
        if family == "qwen2_moe" else 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), decoder_sparse_step=int(step),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )
