"""config.json fields of Qwen3.5's text model (Qwen3_5ForCausalLM): Gated DeltaNet (linear attention)
layers and gated full-attention layers in the order `layer_types` gives (default: every fourth layer
full attention), with transformers' defaults where a config leaves one out. The image-text checkpoints
(Qwen3_5ForConditionalGeneration, ...Moe...) add their vision encoder's config, the image token and
M-RoPE's sections (qwen3_5_vision_fields)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .rope_config import parse_rope, partial_rotary_factor

LINEAR, FULL = "linear_attention", "full_attention"


def qwen3_5_layer_types(cfg: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    kinds = cfg.get("layer_types")
    if kinds is None:
        interval = int(cfg.get("full_attention_interval", 4))
        kinds = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers)]
    if not isinstance(kinds, list) or len(kinds) != num_layers or not set(kinds) <= {LINEAR, FULL}:
        raise ValueError(f"config.json layer_types: expected {num_layers} entries, each {LINEAR!r} or {FULL!r}; "
                         f"got {kinds!r:.120}")
    return tuple(kinds)


def qwen3_5_moe_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen3.5-MoE: every layer's MLP sparse (top-k always renormalized, weights rounded to the
    dtype as Qwen's), beside a shared expert behind a sigmoid gate, as Qwen2-MoE's (server/models/moe.py)."""
    num_experts, top_k = int(cfg.get("num_experts", 256)), int(cfg.get("num_experts_per_tok", 8))
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok must be between 1 and num_experts ({num_experts}), got {top_k}")
    return dict(num_experts=num_experts, num_experts_per_tok=top_k,
                moe_intermediate_size=int(cfg.get("moe_intermediate_size", 512)),
                shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 512)),
                norm_topk_prob=True)


def qwen3_5_fields(cfg: dict[str, Any], family: str = "qwen3_5") -> dict[str, Any]:
    num_layers = int(cfg.get("num_hidden_layers", 32))
    num_heads = int(cfg.get("num_attention_heads", 16))
    head_dim = int(cfg.get("head_dim") or 256)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported for Qwen3.5 (silu only)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "partial_rotary_factor" not in rope and "partial_rotary_factor" not in cfg:
        cfg = {**cfg, "partial_rotary_factor": 0.25}  # transformers' default for this family
    rope_theta, rope_scaling, max_positions = parse_rope(cfg, head_dim, allow_partial=True)
    return dict(
        family=family, vocab_size=int(cfg.get("vocab_size", 248320)), hidden_size=int(cfg.get("hidden_size", 4096)),
        intermediate_size=int(cfg.get("intermediate_size", 0 if family == "qwen3_5_moe" else 12288)), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or 4), head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=max_positions, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=True,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        partial_rotary_factor=partial_rotary_factor(cfg), layer_types=qwen3_5_layer_types(cfg, num_layers),
        conv_kernel=int(cfg.get("linear_conv_kernel_dim", 4)),
        linear_heads=(int(cfg.get("linear_num_key_heads", 16)), int(cfg.get("linear_num_value_heads", 32))),
        linear_head_dims=(int(cfg.get("linear_key_head_dim", 128)), int(cfg.get("linear_value_head_dim", 128))),
        **(qwen3_5_moe_fields(cfg) if family == "qwen3_5_moe" else {}),
    )


def qwen3_5_vision_fields(cfg: dict[str, Any], text: dict[str, Any], hidden_size: int) -> dict[str, Any]:
    """ModelConfig's vision fields of an image-text checkpoint (none without a vision_config): the
    encoder's config, the image placeholder token, and how many of the rotary frequencies (interleaved:
    t, h, w, t, h, w, ...) each of M-RoPE's rows (temporal, height, width) takes, with transformers'
    Qwen3_5Config defaults for what config.json leaves out."""
    vision = cfg.get("vision_config")
    if vision is None:
        return {}
    if not isinstance(vision, dict):
        raise ValueError(f"config.json vision_config: expected the vision encoder's config as an object, got {vision!r:.80}")
    out = int(vision.get("out_hidden_size", 3584))
    if out != hidden_size:
        raise ValueError(f"config.json vision_config.out_hidden_size: {out}, but the text model's hidden_size is "
                         f"{hidden_size}")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    section = rope.get("mrope_section", [11, 11, 10]) if isinstance(rope, dict) else None
    if not isinstance(section, list) or len(section) != 3 or not all(isinstance(n, int) and n >= 0 for n in section):
        raise ValueError(f"config.json text_config.rope_parameters.mrope_section: expected three counts, got {section!r:.80}")
    return dict(vision_config=dict(vision), image_token_id=int(cfg.get("image_token_id", 248056)),
                mrope_section=tuple(section))


# Where Qwen3.5's image-text checkpoints keep their vision encoder and merger (transformers 5, and earlier).
QWEN3_5_VISION_PREFIXES = ("model.visual.", "visual.")


def qwen3_5_vision_on_disk(folder: Path) -> bool:
    """Whether the folder's safetensors hold the vision encoder's tensors, from the index's weight map
    or else the files' headers (no tensor is read). A folder someone saved with the language model's
    weights alone keeps the image-text config.json but has none: it is served for text only. A folder
    without safetensors counts as having them, so that loading reports what is missing as before."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if isinstance(weight_map, dict):
            return any(name.startswith(QWEN3_5_VISION_PREFIXES) for name in weight_map)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return True
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            if any(name.startswith(QWEN3_5_VISION_PREFIXES) for name in f.keys()):  # noqa: SIM118 (not a dict)
                return True
    return False
