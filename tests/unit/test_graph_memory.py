"""The CUDA graphs' memory pool, estimated before the KV cache is sized (server/engine/graph_memory.py):
the arithmetic at Llama-3-8B's shape worked by hand, what each term follows, and that the engine
sets the estimate aside from the KV cache's budget on a GPU."""

from __future__ import annotations

import pytest

from sloth_serve.engine.graph_memory import POOL_MARGIN, activation_bytes_per_token, graph_pool_bytes
from sloth_serve.models.config import ModelConfig

LLAMA_8B = ModelConfig.from_dict(dict(
    architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=5e5,
    max_position_embeddings=8192, tie_word_embeddings=False))
DECODE = [1, 2, 4, 8, 16, 32, 48, 64]  # default_buckets(64)
PREFILL = [16, 32, 64, 128, 256, 384, 512, 768, 1024]  # DEFAULT_PREFILL_BUCKETS


def test_llama_8b_pool_worked_by_hand() -> None:
    # A token at the MLP's peak: hidden state and residual (2 x 4,096) and gate|up, the activated
    # gate and their product (4 x 14,336), in bfloat16.
    assert activation_bytes_per_token(LLAMA_8B, 2) == (2 * 4096 + 4 * 14336) * 2 == 131072
    # Logit rows kept: 175 of the decode graphs, 16 + 32 + 7 x 64 of the prompt graphs; float32.
    kept = (175 + 496) * 128256 * 4
    # The 1,024-token prompt graph is the largest step: its activations and 64 rows of bf16 logits.
    transient = 1024 * 131072 + 64 * 128256 * 2
    assert graph_pool_bytes(LLAMA_8B, 2, DECODE, PREFILL, 64) == int(POOL_MARGIN * (kept + transient))
    with_lora = graph_pool_bytes(LLAMA_8B, 2, DECODE, PREFILL, 64, lora=True)
    assert with_lora == int(POOL_MARGIN * (2 * kept + transient))  # LoRA graphs keep logits of their own
    assert with_lora == 1_048_890_880  # 0.98 GiB: (2 x 344,239,104 + 150,634,496) x 1.25


def test_reference_lora_in_graphs_counts_its_masked_deltas() -> None:
    plain = graph_pool_bytes(LLAMA_8B, 2, DECODE, PREFILL, 64, lora=True)
    wide = graph_pool_bytes(LLAMA_8B, 2, DECODE, PREFILL, 64, lora=True, lora_reference=True)
    assert wide - plain == pytest.approx(POOL_MARGIN * 1024 * (2 * 2 * 14336) * 2, abs=2)  # delta + masked copy
    # Without LoRA graphs the rank of the slots changes nothing.
    assert graph_pool_bytes(LLAMA_8B, 2, DECODE, PREFILL, 64, lora_reference=True) == \
        graph_pool_bytes(LLAMA_8B, 2, DECODE, PREFILL, 64)


def test_largest_step_and_logit_rows_set_the_size() -> None:
    assert graph_pool_bytes(LLAMA_8B, 2, [], [], 64) == 0  # no graphs (eager): nothing set aside
    decode_only = graph_pool_bytes(LLAMA_8B, 2, DECODE, [], 64)
    assert decode_only == int(POOL_MARGIN * (175 * 128256 * 4 + 64 * (131072 + 128256 * 2)))
    # A prompt graph holds at most max_num_seqs sequences: fewer logit rows with fewer sequences.
    assert graph_pool_bytes(LLAMA_8B, 2, [], [1024], 8) < graph_pool_bytes(LLAMA_8B, 2, [], [1024], 64)


def test_experts_widen_the_mlp_term() -> None:
    moe = ModelConfig.from_dict(dict(
        architectures=["Qwen2MoeForCausalLM"], vocab_size=1000, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=512, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=4,
        moe_intermediate_size=32, shared_expert_intermediate_size=64))
    # 4 experts x 32 + the shared expert's 64 = 192 features, wider than the dense 96
    assert activation_bytes_per_token(moe, 4) == (2 * 64 + 4 * 192) * 4


def test_lora_graphs_of_experts_count_the_expert_lora_deltas() -> None:
    moe = ModelConfig.from_dict(dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=1000, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=512, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=48, head_dim=16))
    plain = activation_bytes_per_token(moe, 2)
    # each of a token's 2 (token, expert) pairs: a gate|up delta (2 x 48) and a down delta (64)
    assert activation_bytes_per_token(moe, 2, expert_lora=True) - plain == 2 * (2 * 48 + 64) * 2
    assert activation_bytes_per_token(LLAMA_8B, 2, expert_lora=True) == activation_bytes_per_token(LLAMA_8B, 2)
    with_lora = graph_pool_bytes(moe, 2, [1, 2], [], 8, lora=True)
    kept = 2 * 3 * 1000 * 4
    assert with_lora == int(POOL_MARGIN * (kept + 2 * (plain + 2 * 160 * 2) + 2 * 1000 * 2))
