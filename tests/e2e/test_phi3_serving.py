"""A Phi-4-mini-like checkpoint (Phi3ForCausalLM: fused q|k|v and gate|up, partial rotary, longrope)
served over HTTP with a LoRA adapter trained on its fused modules (`--model <folder> --lora`): the
official `openai` client gets transformers' and PEFT's greedy tokens, whole and streamed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from family_serving import (
    Servers,
    chat_prompt,
    check_base_and_adapter,
    check_chat,
    reference,
    write_random_adapter,
)
from live_server import LiveServer
from phi3_models import write_phi3
from transformers import AutoTokenizer

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, Path]]:
    tmp = tmp_path_factory.mktemp("phi3-serving")
    folder = write_phi3(tmp / "phi4-mini", "phi4-mini", dtype=torch.float32)
    adapter = write_random_adapter(folder, tmp / "adapter", ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])
    with Servers(tmp) as servers:
        server = servers.launch("phi4-mini", folder, "--max-num-batched-tokens", "32", "--device", "cpu",
                                "--dtype", "float32", loras={"tuned": adapter})
        servers.ready(lambda: [reference(folder, lora, [5, 6, 7], MAX_TOKENS) for lora in (None, adapter)])
        yield server, folder, adapter


def test_completions_equal_transformers_and_peft(served: tuple[LiveServer, Path, Path]) -> None:
    server, folder, adapter = served
    assert {m.id for m in server.client().models.list().data} == {"phi4-mini", "tuned"}
    gen = torch.Generator().manual_seed(2)
    # 70 tokens: past the original context of 64, so every token takes longrope's long factors
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (6, 70)]
    check_base_and_adapter(server, folder, "phi4-mini", adapter, prompts, MAX_TOKENS, logprobs=True)


def test_chat_whole_and_streamed_equal_transformers(served: tuple[LiveServer, Path, Path]) -> None:
    server, folder, _ = served
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokens, _ = reference(folder, None, chat_prompt(tokenizer), MAX_TOKENS)
    check_chat(server.client(), "phi4-mini", tokenizer, tokens)
