"""A tiny random Qwen2.5-VL served over HTTP: the official `openai` client sends base64 images in
chat messages and gets transformers' greedy tokens (whole and streamed); two images in one message
work; different images give different answers; bad images, too many images, fetched URLs and images
for a text-only model are 400s naming the part, and the server keeps serving."""

from __future__ import annotations

import asyncio
import copy
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from live_server import LiveServer, launch
from peft import PeftModel
from transformers import AutoTokenizer
from vision_models import (
    MAX_TOKENS,
    ask,
    data_url,
    hf_greedy,
    make_qwen2_5_vl,
    random_image,
    reference_prompt,
    write_adapter,
)

from sloth_serve.api.errors import APIError
from sloth_serve.api.images import chat_images
from sloth_serve.api.protocol import ChatMessage

EXTRA = {"ignore_eos": True, "skip_special_tokens": False}
VISION_AND_LANGUAGE = r".*(language_model.*\.(q_proj|v_proj|down_proj)|visual\..*\.(qkv|attn\.proj|up_proj|mlp\.0))"


@pytest.fixture(scope="module")
def images_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local HTTP server of image files (127.0.0.1, the one domain the served model may fetch from)."""
    root = tmp_path_factory.mktemp("site")
    random_image(7).save(root / "seven.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           images_site: str) -> Iterator[tuple[LiveServer, torch.nn.Module, Path]]:
    tmp = tmp_path_factory.mktemp("vision-serving")
    folder, hf = make_qwen2_5_vl(tmp / "qwen-vl")
    # adapters: one on the vision encoder and the language layers, and a Qwen2-VL one whose vision
    # modules this tower lacks
    write_adapter(copy.deepcopy(hf), tmp / "loras" / "vision", VISION_AND_LANGUAGE)
    write_adapter(make_qwen2_5_vl(tmp / "qwen2-vl", qwen2=True)[1], tmp / "loras" / "mismatch", r".*visual\.blocks.*\.fc1")
    server = launch(tmp, "qwen-vl", "--model", str(folder), "--load-format", "safetensors", "--dtype", "float32",
                    "--block-size", "8", "--max-num-batched-tokens", "24", "--limit-mm-per-prompt", "2",
                    "--allowed-media-domains", "127.0.0.1", "--no-warmup", "--lora-dir", str(tmp / "loras"),
                    "--allow-runtime-lora", demo_adapter=False)
    try:
        server.wait_ready()
        yield server, hf, folder
    finally:
        server.stop()


def test_chat_with_images_equals_transformers(served: tuple[LiveServer, torch.nn.Module, Path]) -> None:
    server, hf, folder = served
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    client = server.client()
    for images in ([random_image(1)], [random_image(2, 17, 33), random_image(3, 32, 32)]):
        prompt = reference_prompt(tokenizer, "What is in the picture?", images)
        expected = tokenizer.decode(hf_greedy(hf, prompt, images), skip_special_tokens=False)
        messages: Any = ask("What is in the picture?", *images)
        r = client.chat.completions.create(model="qwen-vl", messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0, extra_body=EXTRA)
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        assert r.choices[0].message.content == expected
        stream = client.chat.completions.create(model="qwen-vl", messages=messages, max_tokens=MAX_TOKENS,
                                                temperature=0, extra_body=EXTRA, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_vision_lora_per_request_and_loaded_at_run_time(served: tuple[LiveServer, torch.nn.Module, Path]) -> None:
    """An adapter that trains the vision encoder, by name from --lora-dir and loaded through
    /v1/load_lora_adapter: PEFT's tokens; one whose vision modules the tower lacks is a one-line 400
    at either, and the server keeps serving."""
    server, hf, folder = served
    loras = server.log_path.parent / "loras"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    images = [random_image(4)]
    prompt = reference_prompt(tokenizer, "What is in the picture?", images)
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(loras / "vision")).eval()
    expected = tokenizer.decode(hf_greedy(peft, prompt, images), skip_special_tokens=False)
    client = server.client()
    r = httpx.post(f"{server.base_url}/load_lora_adapter", timeout=60,
                   json={"lora_name": "rt-vision", "lora_path": str(loras / "vision")})
    assert r.status_code == 200, r.text
    for model in ("vision", "rt-vision"):
        out = client.chat.completions.create(model=model, messages=ask("What is in the picture?", *images),  # type: ignore[arg-type]
                                             max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
        assert out.choices[0].message.content == expected
    r = httpx.post(f"{server.base_url}/load_lora_adapter", timeout=60,
                   json={"lora_name": "rt-mismatch", "lora_path": str(loras / "mismatch")})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "visual.blocks.0.mlp.fc1, which is no linear layer of this model's vision tower" in message
    assert "\n" not in message
    with pytest.raises(openai.BadRequestError, match="no linear layer"):
        client.chat.completions.create(model="mismatch", messages=ask("Hi?", *images), max_tokens=2)  # type: ignore[arg-type]
    assert server.health()["status"] == "ok"


def test_tokenize_counts_image_tokens(served: tuple[LiveServer, torch.nn.Module, Path]) -> None:
    server, _, folder = served
    images = [random_image(2, 17, 33)]
    body = {"model": "qwen-vl", "messages": ask("What is in the picture?", *images)}
    r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    expected = reference_prompt(AutoTokenizer.from_pretrained(str(folder)), "What is in the picture?", images)
    assert r.json()["tokens"] == expected


def test_responses_api_takes_input_images(served: tuple[LiveServer, torch.nn.Module, Path]) -> None:
    client = served[0].client()
    image = random_image(12)
    chat: Any = client.chat.completions.create(model="qwen-vl", messages=ask("Describe it.", image),  # type: ignore[arg-type]
                                               max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
    r = client.responses.create(model="qwen-vl", max_output_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA,
                                input=[{"role": "user", "content": [  # type: ignore[list-item]
                                    {"type": "input_image", "image_url": data_url(image), "detail": "auto"},
                                    {"type": "input_text", "text": "Describe it."}]}])
    assert r.output_text == chat.choices[0].message.content


def test_different_images_give_different_answers(served: tuple[LiveServer, torch.nn.Module, Path]) -> None:
    client = served[0].client()
    answers = []
    for seed in (20, 21, 20):
        messages: Any = ask("Describe it.", random_image(seed))
        r = client.chat.completions.create(model="qwen-vl", messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0, extra_body=EXTRA)
        answers.append(r.choices[0].message.content)
    assert answers[0] != answers[1] and answers[0] == answers[2]


@pytest.mark.parametrize(("url", "param", "match"), [
    ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==", "messages[0].content[0].image_url", "could not be decoded"),
    ("data:image/png;base64,@@@", "messages[0].content[0].image_url", "not valid base64"),
    ("https://example.com/cat.png", "messages[0].content[0].image_url", "not in --allowed-media-domains"),
    ("data:text/plain;base64,aGk=", "messages[0].content[0].image_url", "data URL of an image"),
])
def test_bad_images_are_400s(served: tuple[LiveServer, torch.nn.Module, Path], url: str, param: str, match: str) -> None:
    client = served[0].client()
    messages: Any = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "hi"}]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="qwen-vl", messages=messages, max_tokens=2)
    body: Any = info.value.body
    assert body["param"] == param and match in body["message"]


def test_too_many_images_is_a_400(served: tuple[LiveServer, torch.nn.Module, Path]) -> None:
    client = served[0].client()
    messages: Any = ask("Three?", random_image(1), random_image(2), random_image(3))
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        client.chat.completions.create(model="qwen-vl", messages=messages, max_tokens=2)
    messages = ask("Still serving?", random_image(4))
    assert client.chat.completions.create(model="qwen-vl", messages=messages, max_tokens=2).choices


def test_text_only_model_refuses_images() -> None:
    messages = [ChatMessage.model_validate(m) for m in ask("hi", random_image(1))]
    with pytest.raises(APIError, match="takes text only") as info:
        asyncio.run(chat_images(None, "demo", messages))
    assert info.value.status_code == 400


def test_image_urls_are_fetched_from_allowed_domains_only(served: tuple[LiveServer, torch.nn.Module, Path],
                                                         images_site: str) -> None:
    client = served[0].client()

    def answer(url: str) -> str | None:
        messages: Any = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Describe it."}]}]
        r = client.chat.completions.create(model="qwen-vl", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body=EXTRA)
        return r.choices[0].message.content

    assert answer(f"http://{images_site}/seven.png") == answer(data_url(random_image(7)))
    port = images_site.rpartition(":")[2]
    for url, match in ((f"http://localhost:{port}/seven.png", "not in --allowed-media-domains"),
                       (f"http://{images_site}/missing.png", "could not be fetched")):
        with pytest.raises(openai.BadRequestError, match=match):
            answer(url)
