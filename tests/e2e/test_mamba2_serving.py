"""A Granite 4 hybrid checkpoint (Mamba-2 + attention layers, MoE + shared MLP, no RoPE; a conv and an
SSM state per running sequence) served over HTTP with a LoRA adapter on its mixer's in_proj, attention
and shared MLP: the official `openai` client gets transformers' and PEFT's greedy tokens, whole and
streamed, from concurrent requests through chunked prefill, and /metrics shows the state slots free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from family_serving import (
    Servers,
    chat_prompt,
    check_base_and_adapter,
    check_chat,
    metric,
    reference,
    write_random_adapter,
    write_random_model,
)
from live_server import LiveServer
from transformers import AutoTokenizer

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, Path]]:
    tmp = tmp_path_factory.mktemp("granite-serving")
    cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8,
        mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, num_local_experts=4, num_experts_per_tok=2,
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=2.0,
        max_position_embeddings=512, initializer_range=0.1, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    folder, _ = write_random_model(cfg, tmp / "granite", generation_config=True)
    adapter = write_random_adapter(folder, tmp / "adapter", ["q_proj", "v_proj", "in_proj", "input_linear",
                                                             "output_linear"])
    with Servers(tmp) as servers:
        server = servers.launch("granite", folder, "--max-num-batched-tokens", "16", "--device", "cpu",
                                "--dtype", "float32", loras={"tuned": adapter})
        servers.ready(lambda: [reference(folder, lora, [5, 6, 7], MAX_TOKENS) for lora in (None, adapter)])
        yield server, folder, adapter


def test_concurrent_completions_equal_transformers_and_peft(served: tuple[LiveServer, Path, Path]) -> None:
    """Base and adapter requests at once, prompts longer than the 16-token budget (chunked prefill)."""
    server, folder, adapter = served
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (6, 37, 2, 23)]
    check_base_and_adapter(server, folder, "granite", adapter, prompts, MAX_TOKENS, at_once=True)


def test_chat_streamed_equals_transformers_and_slots_go_back(served: tuple[LiveServer, Path, Path]) -> None:
    server, folder, _ = served
    tok = AutoTokenizer.from_pretrained(str(folder))
    check_chat(server.client(), "granite", tok, reference(folder, None, chat_prompt(tok), MAX_TOKENS)[0])
    assert metric(server, "sloth:state_slots_in_use") == 0.0  # every request has ended: its slot is free
