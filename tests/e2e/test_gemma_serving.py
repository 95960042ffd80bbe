"""Gemma 2 and a Gemma3ForConditionalGeneration checkpoint served over HTTP (`--model <folder>`,
the demo tokenizer beside tiny random weights): completions, chat and streaming through the official
`openai` client give transformers' greedy tokens and log-probabilities."""

from __future__ import annotations

import importlib.util
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from live_server import LiveServer, launch
from transformers import AutoTokenizer

from sloth_serve.loader import DEMO_MODEL

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gemma_families", ROOT / "tests" / "engine" / "test_gemma_families.py")
assert _spec is not None and _spec.loader is not None
families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(families)

CASES = ["gemma2", "gemma3-multimodal"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[LiveServer, torch.nn.Module]]]:
    tmp = tmp_path_factory.mktemp("gemma-serving")
    models, servers = {}, {}
    try:
        for case in CASES:
            folder, hf = families.make_model(tmp, case)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(DEMO_MODEL / name, folder / name)
            models[case] = hf
            # float32 wherever it runs (the kernels on a GPU host), so that greedy choices are stable
            servers[case] = launch(tmp, case, "--model", str(folder), "--load-format", "safetensors", "--dtype", "float32",
                                   "--block-size", "8", "--max-num-batched-tokens", "24", "--no-warmup",
                                   demo_adapter=False)
        for server in servers.values():
            server.wait_ready()
        yield {case: (servers[case], models[case]) for case in CASES}
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


@pytest.mark.parametrize("case", CASES)
def test_completion_tokens_and_logprobs_equal_transformers(served: dict, tokenizer, case: str) -> None:  # type: ignore[no-untyped-def]
    server, hf = served[case]
    client = server.client()
    model_id = client.models.list().data[0].id
    assert model_id == case  # the folder's name
    for prompt in families.prompts():
        tokens, logprobs = families.hf_greedy(hf, prompt)
        r = client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True, "skip_special_tokens": False})
        choice = r.choices[0]
        assert r.usage is not None and r.usage.completion_tokens == MAX_TOKENS
        assert choice.text == tokenizer.decode(tokens, skip_special_tokens=False)
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(choice.logprobs.token_logprobs, logprobs,
                                                                      strict=True))


@pytest.mark.parametrize("case", CASES)
def test_chat_and_its_stream_equal_transformers(served: dict, tokenizer, case: str) -> None:  # type: ignore[no-untyped-def]
    server, hf = served[case]
    client = server.client()
    messages = [{"role": "user", "content": "What does json.dumps do with a tuple?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = tokenizer.decode(families.hf_greedy(hf, list(prompt))[0], skip_special_tokens=True)
    kwargs = dict(model=case, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert whole.choices[0].message.content == expected
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(stream=True, **kwargs) if chunk.choices)  # type: ignore[call-overload]
    assert streamed == expected
