"""Gemma 2 and a Gemma3ForConditionalGeneration checkpoint served over HTTP (`--model <folder>`,
the demo tokenizer beside tiny random weights): completions, chat and streaming through the official
`openai` client give transformers' greedy tokens and log-probabilities."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from family_serving import (
    Servers,
    chat_prompt,
    check_chat,
    check_completions,
    copy_demo_tokenizer,
    reference,
    tests_module,
)
from live_server import LiveServer
from transformers import AutoTokenizer

families = tests_module("test_gemma_families", "engine")
CASES = ["gemma2", "gemma3-multimodal"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[LiveServer, Path]]]:
    tmp = tmp_path_factory.mktemp("gemma-serving")
    folders = {case: copy_demo_tokenizer(families.make_model(tmp, case)[0]) for case in CASES}
    with Servers(tmp) as servers:
        # float32 wherever it runs (the kernels on a GPU host), so that greedy choices are stable
        started = {case: servers.launch(case, folder, "--max-num-batched-tokens", "24", "--dtype", "float32")
                   for case, folder in folders.items()}
        servers.ready(lambda: [reference(folder, None, [5, 6, 7], 1) for folder in folders.values()])
        yield {case: (started[case], folders[case]) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_completion_tokens_and_logprobs_equal_transformers(served: dict[str, tuple[LiveServer, Path]],
                                                           case: str) -> None:
    server, folder = served[case]
    client = server.client()
    assert client.models.list().data[0].id == case  # the folder's name
    prompts = families.prompts()
    check_completions(client, AutoTokenizer.from_pretrained(str(folder)), [(case, p) for p in prompts],
                      [reference(folder, None, p, MAX_TOKENS) for p in prompts])


@pytest.mark.parametrize("case", CASES)
def test_chat_and_its_stream_equal_transformers(served: dict[str, tuple[LiveServer, Path]], case: str) -> None:
    server, folder = served[case]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    check_chat(server.client(), case, tokenizer, reference(folder, None, chat_prompt(tokenizer), MAX_TOKENS)[0])
