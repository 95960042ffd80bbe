"""config.json fields of the Mamba-2 hybrids: Granite 4 (GraniteMoeHybridForCausalLM: Mamba-2 or
attention layers per `layer_types`, a MoE and/or a shared MLP, Granite's multipliers) and Falcon-H1
(FalconH1ForCausalLM: Mamba-2 and attention side by side in every layer, µP multipliers), with
transformers' defaults where a config leaves one out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .rope_config import parse_rope

MAMBA, ATTENTION = "mamba", "full_attention"
# transformers 5 names (linear_attention / full_attention) and the checkpoints' own (mamba / attention)
_LAYER_KINDS = {"mamba": MAMBA, "linear_attention": MAMBA, "attention": ATTENTION, "full_attention": ATTENTION}


@dataclass(frozen=True, slots=True)
class Mamba2Config:
    """One Mamba-2 mixer's shapes and options (every mixer of a model is alike)."""

    num_heads: int
    head_dim: int
    num_groups: int  # B and C are shared by num_heads / num_groups heads
    state_size: int
    conv_kernel: int
    proj_bias: bool  # in_proj (and Granite's out_proj) bias
    out_bias: bool  # out_proj bias (Falcon-H1: projectors_bias)
    conv_bias: bool
    dt_min: float  # time_step_limit
    dt_max: float
    gated_norm: bool  # a gated RMSNorm before out_proj (False: y * silu(z), Falcon-H1 without mamba_rms_norm)
    norm_before_gate: bool  # rmsnorm(y) * silu(z) rather than rmsnorm(y * silu(z))
    norm_groups: int  # the gated norm normalises num_groups groups of channels (Granite: 1, the whole width)
    in_multiplier: float = 1.0  # Falcon-H1: the input is scaled before in_proj ...
    out_multiplier: float = 1.0  # ... and the output after out_proj
    zxbcdt_multipliers: tuple[float, ...] = (1.0,) * 5  # ... and in_proj's z, x, B, C, dt sections

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """x, B and C go through the convolution together."""
        return self.intermediate_size + 2 * self.num_groups * self.state_size


@dataclass(frozen=True, slots=True)
class Multipliers:
    """The µP scalars these families apply (1.0: none)."""

    embedding: float = 1.0
    residual: float = 1.0  # Granite: each block's output before the residual add
    logits: float = 1.0  # Granite: 1 / logits_scaling; Falcon-H1: lm_head_multiplier
    key: float = 1.0  # Falcon-H1: k_proj's output
    attention_in: float = 1.0  # Falcon-H1: the attention's input ...
    attention_out: float = 1.0  # ... and output
    mlp_gate: float = 1.0  # Falcon-H1: gate_proj's output before the activation ...
    mlp_down: float = 1.0  # ... and down_proj's output


def _dt_limit(cfg: dict[str, Any]) -> tuple[float, float]:
    """time_step_limit; transformers 5 writes an infinite bound as {"__float__": "Infinity"}."""
    limit = cfg.get("time_step_limit") or (0.0, math.inf)
    lo, hi = (float(v["__float__"]) if isinstance(v, dict) else float(v) for v in limit)
    return lo, hi


def _mamba(cfg: dict[str, Any], intermediate: int, **extra: Any) -> Mamba2Config:
    heads = int(cfg.get("mamba_n_heads", 128))
    head_dim = cfg.get("mamba_d_head", "auto")
    head_dim = intermediate // heads if head_dim in (None, "auto") else int(head_dim)
    if heads * head_dim != intermediate:
        raise ValueError(f"config.json: mamba_n_heads ({heads}) x mamba_d_head ({head_dim}) != the mixer's width "
                         f"({intermediate})")
    groups = int(cfg.get("mamba_n_groups", 1))
    if heads % groups:
        raise ValueError(f"config.json: mamba_n_groups ({groups}) does not divide mamba_n_heads ({heads})")
    dt_min, dt_max = _dt_limit(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
    return Mamba2Config(
        num_heads=heads, head_dim=head_dim, num_groups=groups, state_size=int(cfg.get("mamba_d_state", 256)),
        conv_kernel=int(cfg.get("mamba_d_conv", 4)), proj_bias=bool(cfg.get("mamba_proj_bias", False)),
        conv_bias=bool(cfg.get("mamba_conv_bias", True)), dt_min=dt_min, dt_max=dt_max, **extra)


def _common(cfg: dict[str, Any], family: str, head_dim: int) -> dict[str, Any]:
    num_heads = int(cfg.get("num_attention_heads", 32))
    rope_theta, rope_scaling, max_positions = parse_rope(cfg, head_dim)
    return dict(
        family=family, vocab_size=int(cfg.get("vocab_size", 32000)), hidden_size=int(cfg.get("hidden_size", 4096)),
        num_layers=int(cfg.get("num_hidden_layers", 32)), num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads), head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=max_positions, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)),
    )


def granite_hybrid_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Granite 4: `layer_types` (or `layers_block_type`) of mamba / attention layers (all mamba when
    absent, as transformers builds it); num_local_experts 0 is a dense model (the shared MLP alone);
    position_embedding_type "rope" or none (Granite-4.0-H: no positions but the Mamba layers')."""
    hidden = int(cfg.get("hidden_size", 4096))
    num_layers = int(cfg.get("num_hidden_layers", 32))
    kinds = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * num_layers
    if not isinstance(kinds, list) or len(kinds) != num_layers or not set(kinds) <= set(_LAYER_KINDS):
        raise ValueError(f"config.json layer_types: expected {num_layers} entries of mamba / attention; "
                         f"got {kinds!r:.120}")
    head_dim = hidden // int(cfg.get("num_attention_heads", 32))
    fields = _common(cfg, "granitemoehybrid", head_dim)
    experts = int(cfg.get("num_local_experts", 8) or 0)
    layer_kinds = tuple(_LAYER_KINDS[k] for k in kinds)
    fields.update(
        intermediate_size=int(cfg.get("shared_intermediate_size", 1024)),  # the shared MLP's width
        layer_types=layer_kinds,
        num_experts=experts, num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)) if experts else 0,
        moe_intermediate_size=int(cfg.get("intermediate_size", 11008)) if experts else 0, norm_topk_prob=True,
        attn_scale=float(cfg.get("attention_multiplier", 1.0)),
        rope_enabled=cfg.get("position_embedding_type") == "rope",
        # none for an all-attention Granite 4 (granite-4.0-micro): no state, prefix caching as usual
        mamba=_mamba(cfg, int(cfg.get("mamba_expand", 2)) * hidden, out_bias=bool(cfg.get("mamba_proj_bias", False)),
                     gated_norm=True, norm_before_gate=False, norm_groups=1) if MAMBA in layer_kinds else None,
        multipliers=Multipliers(embedding=float(cfg.get("embedding_multiplier", 1.0)),
                                residual=float(cfg.get("residual_multiplier", 1.0)),
                                logits=1.0 / float(cfg.get("logits_scaling", 1.0))),
    )
    return fields


def falcon_h1_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Falcon-H1: every layer runs a Mamba-2 mixer and attention on the same normed input and adds
    them; the mixer's width is mamba_d_ssm (or mamba_expand x hidden)."""
    hidden = int(cfg.get("hidden_size", 4096))
    head_dim = int(cfg.get("head_dim") or hidden // int(cfg.get("num_attention_heads", 32)))
    d_ssm = cfg.get("mamba_d_ssm", 1024)
    intermediate = int(d_ssm) if d_ssm is not None else int(cfg.get("mamba_expand", 2)) * hidden
    ssm_mult = cfg.get("ssm_multipliers") or [1.0] * 5
    mlp_mult = cfg.get("mlp_multipliers") or [1.0, 1.0]
    fields = _common(cfg, "falcon_h1", head_dim)
    fields.update(
        intermediate_size=int(cfg.get("intermediate_size", 14336)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        mamba=_mamba(cfg, intermediate, out_bias=bool(cfg.get("projectors_bias", False)),
                     gated_norm=bool(cfg.get("mamba_rms_norm", False)),
                     norm_before_gate=bool(cfg.get("mamba_norm_before_gate", True)),
                     norm_groups=int(cfg.get("mamba_n_groups", 1)),
                     in_multiplier=float(cfg.get("ssm_in_multiplier", 1.0)),
                     out_multiplier=float(cfg.get("ssm_out_multiplier", 1.0)),
                     zxbcdt_multipliers=tuple(float(m) for m in ssm_mult)),
        multipliers=Multipliers(embedding=float(cfg.get("embedding_multiplier", 1.0)),
                                logits=float(cfg.get("lm_head_multiplier", 1.0)),
                                key=float(cfg.get("key_multiplier", 1.0)),
                                attention_in=float(cfg.get("attention_in_multiplier", 1.0)),
                                attention_out=float(cfg.get("attention_out_multiplier", 1.0)),
                                mlp_gate=float(mlp_mult[0]), mlp_down=float(mlp_mult[1])),
    )
    return fields
