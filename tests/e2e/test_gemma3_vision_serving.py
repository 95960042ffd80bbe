"""A tiny random Gemma 3 with images served over HTTP: the official `openai` client sends base64
images in chat messages and gets transformers' greedy tokens (whole and streamed; its processor's
prompt, counted in usage), with one or two images per message and prompts chunked around the
images; different images give different answers; a text-only chat still gets transformers' tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from gemma3_vision_models import MAX_TOKENS, chat_text, hf_greedy, make_gemma3_vl, reference
from live_server import LiveServer, launch
from transformers import AutoTokenizer
from vision_models import ask, random_image

EXTRA = {"ignore_eos": True, "skip_special_tokens": False}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, torch.nn.Module, Any]]:
    tmp = tmp_path_factory.mktemp("gemma3-vision-serving")
    folder, hf = make_gemma3_vl(tmp / "gemma3-vl")
    server = launch(tmp, "gemma3-vl", "--model", str(folder), "--load-format", "safetensors", "--dtype", "float32",
                    "--block-size", "8", "--max-num-batched-tokens", "24", "--limit-mm-per-prompt", "2",
                    "--no-warmup", demo_adapter=False)
    try:
        server.wait_ready()
        yield server, hf, AutoTokenizer.from_pretrained(str(folder))
    finally:
        server.stop()


def chat(server: LiveServer, messages: Any, stream: bool = False) -> Any:
    return server.client().chat.completions.create(model="gemma3-vl", messages=messages, max_tokens=MAX_TOKENS,
                                                   temperature=0, extra_body=EXTRA, stream=stream)


def test_chat_with_images_equals_transformers(served: tuple[LiveServer, torch.nn.Module, Any]) -> None:
    server, hf, tokenizer = served
    for images in ([random_image(1)], [random_image(2, 17, 33), random_image(3, 40, 24)], []):
        text = chat_text(tokenizer, len(images), "What is in the picture?")
        prompt = reference(tokenizer, text, images)["input_ids"][0].tolist()
        expected = tokenizer.decode(hf_greedy(hf, tokenizer, text, images), skip_special_tokens=False)
        messages = ask("What is in the picture?", *images)
        r = chat(server, messages)
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        assert r.choices[0].message.content == expected
        streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, messages, stream=True) if c.choices)
        assert streamed == expected


def test_tokenize_counts_gemma_image_tokens(served: tuple[LiveServer, torch.nn.Module, Any]) -> None:
    server, _, tokenizer = served
    images = [random_image(4)]
    r = httpx.post(f"{server.url}/tokenize", json={"model": "gemma3-vl", "messages": ask("Which colour?", *images)},
                   timeout=30)
    assert r.status_code == 200, r.text
    text = chat_text(tokenizer, 1, "Which colour?")
    assert r.json()["tokens"] == reference(tokenizer, text, images)["input_ids"][0].tolist()


def test_different_images_give_different_answers(served: tuple[LiveServer, torch.nn.Module, Any]) -> None:
    server = served[0]
    answers = [chat(server, ask("Describe it.", random_image(seed))).choices[0].message.content for seed in (20, 21, 20)]
    assert answers[0] != answers[1] and answers[0] == answers[2]


def test_bad_image_is_a_400_and_serving_goes_on(served: tuple[LiveServer, torch.nn.Module, Any]) -> None:
    import openai

    server = served[0]
    messages: Any = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}},
        {"type": "text", "text": "hi"}]}]
    with pytest.raises(openai.BadRequestError, match="could not be decoded"):
        chat(server, messages)
    assert chat(server, ask("Still serving?", random_image(5))).choices[0].message.content
