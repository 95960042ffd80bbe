"""Real shapes of the model families beyond Llama (config.json fields as the published checkpoints
have them), for random-weight NF4 benchmarks: Gemma 3, Phi-4-mini, Qwen3 dense and MoE, a model the
router sends to the generic path (OLMo 2, Granite 3), and gpt-oss. `--layers N` keeps the first N
decoder layers of a shape (every per-layer figure as published), so a large MoE can be measured on
fewer layers, labelled as such."""

from __future__ import annotations

from typing import Any

from bench.family_shape import FamilyShape
from bench.hybrid_shapes import HYBRID_SHAPES, TINY_HYBRID_SHAPES


def _gemma3(hidden: int, layers: int, inter: int, heads: int, kv: int, factor: float, source: str) -> FamilyShape:
    # Gemma3ForCausalLM (text only): Unsloth's gemma-3-*-it folders are Gemma3ForConditionalGeneration, whose
    # text model our loader serves the same way (the vision tower is not loaded and would not be timed).
    return FamilyShape("gemma3_text", "Gemma3ForCausalLM", dict(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=256, vocab_size=262208, query_pre_attn_scalar=256, sliding_window=1024,
        sliding_window_pattern=6, max_position_embeddings=131072,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": factor, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    ), source)


# Phi-4-mini's longrope factors are 48 per kind (rotary_dim 96 / 2); values of the published shape.
_PHI4_SHORT = [1.0] * 48
_PHI4_LONG = [round(1.0 + 0.5 * i, 2) for i in range(48)]

SHAPES: dict[str, FamilyShape] = {
    "gemma3-4b": _gemma3(2560, 34, 10240, 8, 4, 8.0, "google/gemma-3-4b-it (text model)"),
    "gemma3-12b": _gemma3(3840, 48, 15360, 16, 8, 8.0, "google/gemma-3-12b-it (text model)"),
    "phi4-mini": FamilyShape("phi3", "Phi3ForCausalLM", dict(
        hidden_size=3072, num_hidden_layers=32, intermediate_size=8192, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=200064, partial_rotary_factor=0.75, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True, sliding_window=262144,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _PHI4_SHORT,
                         "long_factor": _PHI4_LONG, "original_max_position_embeddings": 4096},
    ), "microsoft/Phi-4-mini-instruct"),
    "qwen3-8b": FamilyShape("qwen3", "Qwen3ForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=36, intermediate_size=12288, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
    ), "Qwen/Qwen3-8B"),
    "qwen3-30b-a3b": FamilyShape("qwen3_moe", "Qwen3MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=48, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ), "Qwen/Qwen3-30B-A3B", skip_modules=("lm_head", "mlp.gate")),  # the router stays 16-bit, as Unsloth's
    "olmo2-7b": FamilyShape("olmo2", "Olmo2ForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=100352, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
    ), "allenai/OLMo-2-1124-7B"),
    "granite3-8b": FamilyShape("granite", "GraniteForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=40, intermediate_size=12800, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=49159, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0}, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=16.0, tie_word_embeddings=True,
    ), "ibm-granite/granite-3.3-8b-instruct"),
    # gpt-oss in transformers' layout (GptOssExperts: 3-D gate_up_proj [E, H, 2I] with gate/up interleaved,
    # down_proj, their biases; sinks), experts, router and sinks 16-bit, attention NF4: what transformers +
    # bitsandbytes write, and what server/models/gpt_oss_experts.py reads. TODO: Unsloth's 4-bit uploads keep
    # one NF4 linear per expert (gate_up_projs.<e>); write that layout too (--moe-experts nf4) once its names
    # on disk are pinned by a loader test.
    "gpt-oss-20b": FamilyShape("gpt_oss", "GptOssForCausalLM", dict(
        hidden_size=2880, num_hidden_layers=24, intermediate_size=2880, num_local_experts=32,
        num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
        sliding_window=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=True, rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                              "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                              "original_max_position_embeddings": 4096},
    ), "openai/gpt-oss-20b", skip_modules=("lm_head", "mlp.router")),
}

# CPU smoke tests: each family's tiny twin (same code paths, hidden 64, 2-3 layers, a 512-id vocabulary).
_TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=512)


def tiny_shape(name: str) -> FamilyShape:
    """`name` shrunk to a few layers of small dims, its family's own features kept."""
    shape = SHAPES[name]
    fields = {**shape.fields, **_TINY}
    if shape.model_type == "gemma3_text":
        fields.update(num_hidden_layers=3, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16)
    elif shape.model_type == "phi3":
        fields.pop("head_dim")  # Phi-3 derives it; rotary 12 of 16 dims -> 6 factors per kind
        fields["rope_parameters"] = {**fields["rope_parameters"], "short_factor": [1.0] * 6,
                                     "long_factor": [1.0 + 0.5 * i for i in range(6)]}
    elif shape.model_type == "qwen3_moe":
        fields.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
    elif shape.model_type == "gpt_oss":
        fields.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=8)
    elif shape.model_type == "olmo2":
        fields["num_key_value_heads"] = 4
    return FamilyShape(shape.model_type, shape.architecture, fields, f"tiny {name}", shape.skip_modules)


# Registered as shapes too ("tiny-gemma3-4b", ...): what the CPU smoke tests build through the CLI.
SHAPES.update({f"tiny-{name}": tiny_shape(name) for name in list(SHAPES)})
# Hybrid families (bench/hybrid_shapes.py), registered last: their tiny twins are their own.
SHAPES.update(HYBRID_SHAPES)
SHAPES.update(TINY_HYBRID_SHAPES)


def hf_config(shape: FamilyShape, layers: int | None = None, vocab: int | None = None) -> Any:
    """transformers' config object of the shape (first `layers` decoder layers, `vocab` ids)."""
    from transformers import AutoConfig

    fields = dict(shape.fields)
    if layers:
        if not 1 <= layers <= shape.layers:
            raise ValueError(f"--layers must be between 1 and {shape.layers} for this shape, got {layers}")
        fields["num_hidden_layers"] = layers
    if vocab:
        fields["vocab_size"] = vocab
    pattern = fields.pop("sliding_window_pattern", None)
    if pattern:  # Gemma 3: every `pattern`-th layer global, the rest sliding-window
        fields["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                 for i in range(fields["num_hidden_layers"])]
    cfg = AutoConfig.for_model(shape.model_type, architectures=[shape.architecture], dtype="bfloat16", **fields)
    return cfg
