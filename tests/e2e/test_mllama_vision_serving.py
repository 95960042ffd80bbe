"""A tiny random Llama 3.2 Vision (MllamaForConditionalGeneration) served over HTTP: the official
`openai` client sends base64 PNG images in chat messages and gets transformers' greedy tokens (whole
and streamed; its processor's prompt, counted in usage), with one or two images per message and the
prompt prefilled over several steps; different images give different answers; a bad image is a 400
with OpenAI's error JSON and serving goes on; structured output works although the tokenizer holds
one token (<|image|>) more than the logits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch
from live_server import LiveServer, launch
from mllama_models import IMAGE_TOKEN, MAX_TOKENS, chat_text, hf_greedy, make_mllama
from transformers import AutoTokenizer
from vision_models import ask, random_image

EXTRA = {"ignore_eos": True, "skip_special_tokens": False}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, torch.nn.Module, Any]]:
    tmp = tmp_path_factory.mktemp("mllama-serving")
    folder, hf = make_mllama(tmp / "mllama")
    server = launch(tmp, "mllama", "--model", str(folder), "--load-format", "safetensors", "--dtype", "float32",
                    "--block-size", "8", "--max-num-batched-tokens", "8", "--limit-mm-per-prompt", "2",
                    "--no-warmup", demo_adapter=False)
    try:
        server.wait_ready()
        yield server, hf, AutoTokenizer.from_pretrained(str(folder))
    finally:
        server.stop()


def chat(server: LiveServer, messages: Any, stream: bool = False, **kwargs: Any) -> Any:
    kwargs = {"max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": EXTRA, **kwargs}
    return server.client().chat.completions.create(model="mllama", messages=messages, stream=stream, **kwargs)


def test_chat_with_images_equals_transformers(served: tuple[LiveServer, torch.nn.Module, Any]) -> None:
    server, hf, tokenizer = served
    for images in ([random_image(1, 30, 20)], [random_image(2, 12, 30), random_image(3)], []):
        text = chat_text(tokenizer, [IMAGE_TOKEN] * len(images) + ["What is in the picture?"])
        prompt, tokens = hf_greedy(hf, tokenizer, text, images)
        expected = tokenizer.decode(tokens, skip_special_tokens=False)
        messages = ask("What is in the picture?", *images)
        r = chat(server, messages)
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        assert r.choices[0].message.content == expected
        streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, messages, stream=True) if c.choices)
        assert streamed == expected


def test_different_images_give_different_answers(served: tuple[LiveServer, torch.nn.Module, Any]) -> None:
    server = served[0]
    answers = [chat(server, ask("Describe it.", random_image(seed))).choices[0].message.content for seed in (20, 21, 20)]
    assert answers[0] != answers[1] and answers[0] == answers[2]


def test_bad_image_is_a_400_and_serving_goes_on(served: tuple[LiveServer, torch.nn.Module, Any]) -> None:
    server = served[0]
    messages: Any = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}},
        {"type": "text", "text": "hi"}]}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(server, messages)
    assert info.value.status_code == 400
    error = info.value.response.json()["error"]
    assert "could not be decoded" in error["message"] and error["type"] == "invalid_request_error"
    assert chat(server, ask("Still serving?", random_image(5))).choices[0].message.content


def test_structured_output_with_an_image(served: tuple[LiveServer, torch.nn.Module, Any]) -> None:
    server = served[0]
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}}
    r = chat(server, ask("Which colour is it?", random_image(6)), max_tokens=48, response_format=fmt,
             extra_body={})
    assert json.loads(r.choices[0].message.content)["colour"] in {"red", "green", "blue"}
