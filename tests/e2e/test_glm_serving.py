"""GLM-4 served natively over HTTP (a tiny random Glm4ForCausalLM with the demo tokenizer, and a PEFT
adapter on it as `--lora tuned=...`): the official `openai` client gets transformers' greedy tokens for
the base and PEFT's for the adapter, base and adapter requests at once, and a chat streamed equals its
whole reply. (Cohere, StableLM and EXAONE 4.0 run the same server code; their model code is checked
through the engine, tests/engine/test_layernorm_families.py and test_exaone4_family.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from family_serving import (
    Servers,
    check_base_and_adapter,
    check_chat_stream_equals_whole,
    reference,
    write_random_adapter,
    write_random_model,
)
from live_server import LiveServer

MAX_TOKENS = 8
PROMPT_LENGTHS = (5, 29)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, Path]]:
    tmp = tmp_path_factory.mktemp("glm-serving")
    # interleaved RoPE on half of each head, fused gate_up on disk, norms after attention and MLP
    cfg = transformers.Glm4Config(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.3,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    folder, _ = write_random_model(cfg, tmp / "glm4")
    adapter = write_random_adapter(folder, tmp / "adapter", ["q_proj", "v_proj", "o_proj", "gate_up_proj"])
    with Servers(tmp) as servers:
        server = servers.launch(
            "glm4",
            folder,
            "--max-num-batched-tokens",
            "16",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            loras={"tuned": adapter},
        )
        servers.ready(
            lambda: [reference(folder, lora, p, MAX_TOKENS) for lora in (None, adapter) for p in prompts()]
        )
        yield server, folder, adapter


def test_completions_equal_transformers_and_peft(served: tuple[LiveServer, Path, Path]) -> None:
    server, folder, adapter = served
    check_base_and_adapter(server, folder, "glm4", adapter, prompts(), MAX_TOKENS, at_once=True)


def test_chat_stream_equals_its_whole_reply(served: tuple[LiveServer, Path, Path]) -> None:
    check_chat_stream_equals_whole(served[0].client(), "glm4")
