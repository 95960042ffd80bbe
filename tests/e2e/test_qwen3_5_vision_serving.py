"""A tiny random Qwen3.5 image-text model (Qwen3_5ForConditionalGeneration) served over HTTP: the
official `openai` client sends base64 images in chat messages and gets transformers' greedy tokens,
whole and streamed, with one and two images per message and a prompt chunked across its images; a
text-only chat too; different images give different answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from live_server import LiveServer, launch
from transformers import AutoTokenizer
from vision_models import MAX_TOKENS, ask, hf_greedy, random_image, reference_prompt
from vision_qwen3_5 import make_qwen3_5_vl

EXTRA = {"ignore_eos": True, "skip_special_tokens": False}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, torch.nn.Module, Path]]:
    tmp = tmp_path_factory.mktemp("qwen3_5-vision-serving")
    folder, hf = make_qwen3_5_vl(tmp / "qwen3_5-vl")
    server = launch(tmp, "qwen3_5-vl", "--model", str(folder), "--load-format", "safetensors", "--dtype", "float32",
                    "--block-size", "8", "--max-num-batched-tokens", "16", "--limit-mm-per-prompt", "2",
                    "--no-warmup", demo_adapter=False)
    try:
        server.wait_ready()
        yield server, hf, folder
    finally:
        server.stop()


def chat(server: LiveServer, messages: Any, stream: bool = False) -> Any:
    return server.client().chat.completions.create(model="qwen3_5-vl", messages=messages, max_tokens=MAX_TOKENS,
                                                   temperature=0, extra_body=EXTRA, stream=stream)


def test_chat_with_images_equals_transformers(served: tuple[LiveServer, torch.nn.Module, Path]) -> None:
    server, hf, folder = served
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for images in ([random_image(1)], [random_image(2, 17, 33), random_image(3, 32, 32)], []):
        prompt = reference_prompt(tokenizer, "What is in the picture?", images)
        expected = tokenizer.decode(hf_greedy(hf, prompt, images), skip_special_tokens=False)
        messages = ask("What is in the picture?", *images) if images else [
            {"role": "user", "content": "What is in the picture?"}]
        r = chat(server, messages)
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        assert r.choices[0].message.content == expected
        streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, messages, stream=True) if c.choices)
        assert streamed == expected
    answers = [chat(server, ask("Describe it.", random_image(seed))).choices[0].message.content for seed in (20, 21)]
    assert answers[0] != answers[1]
