"""A mixture-of-experts model whose experts are one bitsandbytes 4-bit linear per expert (Unsloth's
`-bnb-4bit` MoE layout; a tiny random Qwen2-MoE with a shared expert) served over HTTP from the
default loading path (Unsloth, the experts read from the files in NF4): the official `openai` client
gets transformers' greedy tokens on the dequantized weights."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from live_server import LiveServer, launch
from transformers import AutoTokenizer

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("loader", "engine")]
from test_moe_per_expert_4bit import dequantized_reference, greedy, write_per_expert_4bit  # noqa: E402

PROMPT = [5, 17, 99, 200, 3, 42, 7]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, torch.nn.Module]]:
    tmp = tmp_path_factory.mktemp("moe-4bit-serving")
    folder = write_per_expert_4bit(tmp, "qwen2_moe")
    reference = dequantized_reference(folder, tmp / "dense")
    server = launch(tmp, "moe4bit", "--model", str(folder), "--block-size", "8", "--no-warmup", demo_adapter=False)
    try:
        server.wait_ready()
        yield server, folder, reference
    finally:
        server.stop()


def test_completions_equal_transformers_on_the_dequantized_weights(
        served: tuple[LiveServer, Path, torch.nn.Module]) -> None:
    server, folder, reference = served
    expected = greedy(reference, PROMPT)
    r = server.client().completions.create(model=folder.name, prompt=PROMPT, max_tokens=len(expected),
                                           temperature=0,
                                           extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert r.usage is not None and r.usage.completion_tokens == len(expected)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=False)
