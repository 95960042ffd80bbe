"""A tiny random Mistral 3 with images served over HTTP: the official `openai` client sends base64
images in chat messages and gets transformers' greedy tokens (whole and streamed; PixtralProcessor's
prompt, counted in usage), with one or two images per message and a prompt chunked across its images;
different images give different answers; a text-only chat still gets transformers' tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from live_server import LiveServer, launch
from mistral3_vision_models import MAX_TOKENS, chat_text, hf_greedy, make_mistral3, reference_prompt
from transformers import AutoTokenizer
from vision_models import data_url, random_image

EXTRA = {"ignore_eos": True, "skip_special_tokens": False}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, torch.nn.Module, Any]]:
    tmp = tmp_path_factory.mktemp("mistral3-vision-serving")
    folder, hf = make_mistral3(tmp / "mistral3")
    server = launch(tmp, "mistral3", "--model", str(folder), "--load-format", "safetensors", "--dtype", "float32",
                    "--block-size", "8", "--max-num-batched-tokens", "16", "--limit-mm-per-prompt", "2",
                    "--no-warmup", demo_adapter=False)
    try:
        server.wait_ready()
        yield server, hf, AutoTokenizer.from_pretrained(str(folder))
    finally:
        server.stop()


def ask(question: str, *images: Any) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def chat(server: LiveServer, messages: Any, stream: bool = False) -> Any:
    return server.client().chat.completions.create(model="mistral3", messages=messages, max_tokens=MAX_TOKENS,
                                                   temperature=0, extra_body=EXTRA, stream=stream)


def test_chat_with_images_equals_transformers(served: tuple[LiveServer, torch.nn.Module, Any]) -> None:
    server, hf, tokenizer = served
    for images in ([random_image(1)], [random_image(2, 17, 33), random_image(3, 40, 24)], []):
        prompt = reference_prompt(tokenizer, chat_text(tokenizer, len(images), "What is in the picture?"), images)
        expected = tokenizer.decode(hf_greedy(hf, prompt, images), skip_special_tokens=False)
        messages = ask("What is in the picture?", *images)
        r = chat(server, messages)
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        assert r.choices[0].message.content == expected
        streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, messages, stream=True) if c.choices)
        assert streamed == expected
    answers = [chat(server, ask("Describe it.", random_image(seed))).choices[0].message.content for seed in (20, 21)]
    assert answers[0] != answers[1]
