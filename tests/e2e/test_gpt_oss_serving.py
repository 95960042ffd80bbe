"""gpt-oss served over HTTP (`--model <folder>` of a tiny random gpt-oss with the demo tokenizer,
sliding window 8): the official `openai` client gets transformers' greedy tokens for a prompt longer
than the window, and a chat stream equals its whole reply."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from live_server import LiveServer, launch
from transformers import AutoTokenizer

from sloth_serve.loader import DEMO_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_gpt_oss import WINDOW, hf_greedy, make_model  # the tiny random gpt-oss

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, torch.nn.Module]]:
    tmp = tmp_path_factory.mktemp("gpt-oss-serving")
    folder, hf = make_model(tmp)
    server = launch(tmp, "gpt-oss", "--model", str(folder), "--load-format", "safetensors", "--dtype", "float32",
                    "--block-size", "8", "--max-num-batched-tokens", "24", "--no-warmup", demo_adapter=False)
    try:
        server.wait_ready()
        yield server, hf
    finally:
        server.stop()


def test_completions_equal_transformers(served: tuple[LiveServer, torch.nn.Module]) -> None:
    server, hf = served
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    prompt = tokenizer.encode("def parse(line): return [int(x) for x in line.split(',') if x.strip()]")
    assert len(prompt) > 2 * WINDOW
    expected = hf_greedy(hf, prompt, MAX_TOKENS)
    r = server.client().completions.create(model="gpt-oss", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert r.usage is not None and r.usage.completion_tokens == MAX_TOKENS
    assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=False)


def test_chat_stream_equals_its_whole_reply(served: tuple[LiveServer, torch.nn.Module]) -> None:
    client = served[0].client()
    messages = [{"role": "user", "content": "What does json.dumps do with a tuple?"}]
    whole = client.chat.completions.create(model="gpt-oss", messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    stream = client.chat.completions.create(model="gpt-oss", messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert whole.choices[0].message.content == text and whole.usage is not None
    assert whole.usage.completion_tokens >= 1
