"""A family served on the generic path over HTTP (`--model <folder>` of a tiny random Cohere model
with q/k norms, which only transformers' modules compute, with the demo tokenizer, and a PEFT adapter
on it as `--lora`): the official `openai` client gets transformers' (and PEFT's) greedy tokens from
completions, and chat streams the same as it returns. (Other generic-path families are served in
test_families_serving.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from family_serving import (
    Servers,
    check_base_and_adapter,
    check_chat_stream_equals_whole,
    reference,
    tests_module,
)
from live_server import LiveServer

generic = tests_module("test_generic_path", "engine")
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, Path]]:
    tmp = tmp_path_factory.mktemp("generic-serving")
    folder, hf = generic.make_model(tmp, "cohere", tokenizer=True)
    adapter = generic.write_adapter(hf, tmp / "adapter", seed=3)
    with Servers(tmp) as servers:
        server = servers.launch("cohere", folder, "--dtype", "float32", "--max-num-batched-tokens", "24",
                                loras={"tuned": adapter})
        servers.ready(lambda: [reference(folder, lora, [5, 6, 7], 1) for lora in (None, adapter)])
        yield server, folder, adapter


def test_completions_equal_transformers_and_peft(served: tuple[LiveServer, Path, Path]) -> None:
    server, folder, adapter = served
    assert {m.id for m in server.client().models.list().data} == {"cohere", "tuned"}
    check_base_and_adapter(server, folder, "cohere", adapter, generic.prompts()[1:2], MAX_TOKENS)


def test_chat_stream_equals_its_whole_reply(served: tuple[LiveServer, Path, Path]) -> None:
    check_chat_stream_equals_whole(served[0].client(), "cohere")
