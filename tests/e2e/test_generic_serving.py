"""A family served on the generic path over HTTP (`--model <folder>` of a tiny random Cohere model
with the demo tokenizer, and a PEFT adapter on it as `--lora`): the official `openai` client gets
transformers' (and PEFT's) greedy tokens from completions, and chat streams the same as it returns."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from live_server import LiveServer, launch
from transformers import AutoTokenizer

from sloth_serve.loader import DEMO_MODEL

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("generic_path", ROOT / "tests" / "engine" / "test_generic_path.py")
assert _spec is not None and _spec.loader is not None
generic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generic)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, torch.nn.Module, Path, Path]]:
    tmp = tmp_path_factory.mktemp("generic-serving")
    folder, hf = generic.make_model(tmp, "cohere", tokenizer=True)
    adapter = generic.write_adapter(hf, tmp / "adapter", seed=3)
    server = launch(tmp, "cohere", "--model", str(folder), "--load-format", "safetensors", "--dtype", "float32",
                    "--lora", f"tuned={adapter}", "--block-size", "8", "--max-num-batched-tokens", "24",
                    "--no-warmup", demo_adapter=False)
    try:
        server.wait_ready()
        yield server, hf, folder, adapter
    finally:
        server.stop()


def test_completions_equal_transformers_and_peft(served: tuple[LiveServer, torch.nn.Module, Path, Path]) -> None:
    server, hf, folder, adapter = served
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    client = server.client()
    assert {m.id for m in client.models.list().data} == {"cohere", "tuned"}
    prompt = generic.prompts()[1]
    for model, expected in (("cohere", generic.hf_greedy(hf, prompt)),
                            ("tuned", generic.peft_greedy(folder, adapter, prompt))):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=generic.MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True, "skip_special_tokens": False})
        assert r.usage is not None and r.usage.completion_tokens == generic.MAX_TOKENS
        assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=False), model


def test_chat_stream_equals_its_whole_reply(served: tuple[LiveServer, torch.nn.Module, Path, Path]) -> None:
    client = served[0].client()
    messages = [{"role": "user", "content": "What does json.dumps do with a tuple?"}]
    whole = client.chat.completions.create(model="cohere", messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    stream = client.chat.completions.create(model="cohere", messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert whole.choices[0].message.content == text and whole.usage is not None
    assert whole.usage.completion_tokens >= 1
