"""GLM-4 served over HTTP (`--model <folder>` of a tiny random Glm4ForCausalLM with the demo tokenizer,
and a PEFT adapter on it as `--lora`): the official `openai` client gets transformers' greedy tokens
for the base and PEFT's for the adapter."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from live_server import LiveServer, launch
from transformers import AutoTokenizer

from server.loader import DEMO_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_glm_families import hf_greedy, make_model, peft_greedy, write_adapter  # the tiny random GLM-4

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, torch.nn.Module, Path, Path]]:
    tmp = tmp_path_factory.mktemp("glm-serving")
    folder, hf = make_model(tmp, "glm4", tokenizer=True)
    adapter = write_adapter(hf, tmp / "adapter")
    server = launch(
        tmp,
        "glm4",
        "--model",
        str(folder),
        "--load-format",
        "safetensors",
        "--dtype",
        "float32",
        "--lora",
        f"tuned={adapter}",
        "--block-size",
        "8",
        "--max-num-batched-tokens",
        "24",
        "--no-warmup",
        demo_adapter=False,
    )
    try:
        server.wait_ready()
        yield server, hf, folder, adapter
    finally:
        server.stop()


def test_completions_equal_transformers_and_peft(
    served: tuple[LiveServer, torch.nn.Module, Path, Path],
) -> None:
    server, hf, folder, adapter = served
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    prompt = tokenizer.encode("def parse(line): return [int(x) for x in line.split(',') if x.strip()]")
    client = server.client()
    for model, expected in (
        ("glm4", hf_greedy(hf, prompt, MAX_TOKENS)),
        ("tuned", peft_greedy(folder, adapter, prompt, MAX_TOKENS)),
    ):
        r = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
        assert r.usage is not None and r.usage.completion_tokens == MAX_TOKENS
        assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=False), model
