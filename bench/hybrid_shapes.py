"""Real shapes of the hybrid families (recurrent or convolution layers beside attention), for the
random-weight NF4 benchmarks of bench/families.py, registered into bench/family_shapes.SHAPES with a
tiny twin each: LFM2-1.2B (gated short convolutions + 6 attention layers of 16) and a Qwen3.5 text
model of transformers' Qwen3_5TextConfig defaults (Gated DeltaNet + gated attention every fourth layer,
8.9B parameters: the size class of Qwen3.5-9B, whose own config.json was not at hand here), and its
MoE twin of transformers' Qwen3_5MoeTextConfig defaults (256 experts, 8 active: Qwen3.5-35B-A3B's class)."""

from __future__ import annotations

from bench.family_shape import FamilyShape

HYBRID_SHAPES: dict[str, FamilyShape] = {
    "lfm2-1.2b": FamilyShape("lfm2", "Lfm2ForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=16, intermediate_size=12288, block_auto_adjust_ff_dim=True,
        block_ffn_dim_multiplier=1.0, block_multiple_of=256, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=65536, max_position_embeddings=128000, norm_eps=1e-5, conv_L_cache=3, conv_bias=False,
        full_attn_idxs=[2, 5, 8, 10, 12, 14], rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
    ), "LiquidAI/LFM2-1.2B"),
    "qwen3.5-9b": FamilyShape("qwen3_5_text", "Qwen3_5ForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=12288, num_attention_heads=16,
        num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    ), "transformers' Qwen3_5TextConfig defaults (Qwen3.5-9B size class)"),
    "qwen3.5-35b-a3b": FamilyShape("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, vocab_size=248320, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    ), "transformers' Qwen3_5MoeTextConfig defaults (Qwen3.5-35B-A3B size class)",
        skip_modules=("lm_head", "mlp.gate", "shared_expert_gate")),  # routers stay 16-bit, as for Qwen3-MoE
}

# The tiny twins keep the layer pattern's two kinds (a convolution layer, then an attention layer).
TINY_HYBRID_SHAPES: dict[str, FamilyShape] = {
    "tiny-lfm2-1.2b": FamilyShape("lfm2", "Lfm2ForCausalLM", {
        **HYBRID_SHAPES["lfm2-1.2b"].fields, "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 192,
        "block_multiple_of": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "full_attn_idxs": [1]}, "tiny lfm2-1.2b"),
    "tiny-qwen3.5-9b": FamilyShape("qwen3_5_text", "Qwen3_5ForCausalLM", {
        **HYBRID_SHAPES["qwen3.5-9b"].fields, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "vocab_size": 512,
        "layer_types": ["linear_attention", "full_attention"]}, "tiny qwen3.5-9b"),
    "tiny-qwen3.5-35b-a3b": FamilyShape("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", {
        **HYBRID_SHAPES["qwen3.5-35b-a3b"].fields, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "vocab_size": 512,
        "layer_types": ["linear_attention", "full_attention"]}, "tiny qwen3.5-35b-a3b",
        skip_modules=HYBRID_SHAPES["qwen3.5-35b-a3b"].skip_modules),
}
