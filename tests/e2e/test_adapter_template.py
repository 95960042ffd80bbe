"""Adapters served with their own tokenizer, chat template and EOS (what `save_pretrained` writes
beside them), through a live server: started with --lora, loaded lazily from --lora-dir, or loaded
at run time; the base keeps its own (or --chat-template's); /v1/models says which is which; a
malformed template is one line at start-up or a 400 at lazy load."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapter_folders import ALPACA, SQL_ID, adapter_folder, save_alpaca_tokenizer
from live_server import BASE_MODEL, REPO, LiveServer, launch
from openai import AsyncOpenAI

from sloth_serve.api.logprobs import TokenTexts
from sloth_serve.api.tokenizers import load_tokenizer
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.chat_template import template_hash

FLAG = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
       "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
HELLO = [{"role": "user", "content": "Write a short greeting."}]
PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-dir")
    for name in ("lazy-alpaca", "runtime-alpaca"):
        save_alpaca_tokenizer(adapter_folder(root, name))
    adapter_folder(root, "plain")
    broken = adapter_folder(root, "broken")
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    return root


@pytest.fixture(scope="module")
def alpaca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = adapter_folder(tmp_path_factory.mktemp("alpaca"), "alpaca")
    save_alpaca_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, lora_dir: Path, alpaca_dir: Path) -> Iterator[dict[str, LiveServer]]:
    tmp = tmp_path_factory.mktemp("template-servers")
    template_file = tmp / "flag.jinja"
    template_file.write_text(FLAG)
    started = {
        "own": launch(tmp, "own", "--lora", f"alpaca={alpaca_dir}", "--lora-dir", str(lora_dir), "--allow-runtime-lora"),
        "flag": launch(tmp, "flag", "--lora", f"alpaca={alpaca_dir}", "--chat-template", str(template_file)),
    }
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(DEMO_MODEL)


def tokenize(server: LiveServer, model: str, **body: Any) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"model": model, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["tokens"])


def models(server: LiveServer) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(f"{server.base_url}/models", timeout=30).json()["data"]}


def chat(server: LiveServer, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": HELLO, "max_tokens": 6, "temperature": 0, **extra}
    r = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_adapter_prompt_follows_its_template_and_base_follows_its_own(servers: dict[str, LiveServer], tokenizer: Any) -> None:
    own = servers["own"]
    alpaca_text = "### Instruction:\nWrite a short greeting.\n\n### Response:\n"
    chatml_text = "<|im_start|>user\nWrite a short greeting.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenize(own, "alpaca", messages=HELLO) == tokenizer.encode(alpaca_text, add_special_tokens=False)
    assert tokenize(own, BASE_MODEL, messages=HELLO) == tokenizer.encode(chatml_text, add_special_tokens=False)
    assert tokenize(own, "upper", messages=HELLO) == tokenize(own, BASE_MODEL, messages=HELLO)  # no template of its own
    # The engine gets those ids: the prompt's token count is the template's.
    assert chat(own, "alpaca")["usage"]["prompt_tokens"] == len(tokenizer.encode(alpaca_text, add_special_tokens=False))
    assert chat(own, BASE_MODEL)["usage"]["prompt_tokens"] == len(tokenizer.encode(chatml_text, add_special_tokens=False))


def test_adapter_added_tokens_encode_to_their_ids(servers: dict[str, LiveServer]) -> None:
    own = servers["own"]
    assert tokenize(own, "alpaca", prompt="<SQL>", add_special_tokens=False) == [SQL_ID]
    assert SQL_ID not in tokenize(own, BASE_MODEL, prompt="<SQL>", add_special_tokens=False)


def test_models_say_which_template_each_uses(servers: dict[str, LiveServer]) -> None:
    cards = models(servers["own"])
    assert (cards[BASE_MODEL]["chat_template"], cards[BASE_MODEL]["tokenizer"]) == ("base", "base")
    assert (cards["upper"]["chat_template"], cards["upper"]["tokenizer"]) == ("base", "base")
    assert (cards["alpaca"]["chat_template"], cards["alpaca"]["tokenizer"]) == ("adapter", "adapter")
    assert cards["alpaca"]["chat_template_hash"] == template_hash(ALPACA) != cards[BASE_MODEL]["chat_template_hash"]
    flag = models(servers["flag"])
    assert flag[BASE_MODEL]["chat_template"] == flag["upper"]["chat_template"] == "flag"
    assert flag[BASE_MODEL]["chat_template_hash"] == template_hash(FLAG)
    assert flag["alpaca"]["chat_template"] == "adapter"


def test_chat_template_flag_serves_the_base_and_adapters_without_their_own(servers: dict[str, LiveServer], tokenizer: Any) -> None:
    flag = servers["flag"]
    expected = tokenizer.encode("<|im_start|>user: Write a short greeting.\n<|im_start|>assistant: ", add_special_tokens=False)
    assert tokenize(flag, BASE_MODEL, messages=HELLO) == expected
    assert tokenize(flag, "upper", messages=HELLO) == expected
    assert chat(flag, BASE_MODEL)["usage"]["prompt_tokens"] == len(expected)
    assert tokenize(flag, "alpaca", messages=HELLO) == tokenize(servers["own"], "alpaca", messages=HELLO)


def test_lazy_and_runtime_loaded_adapters_use_their_templates(servers: dict[str, LiveServer], lora_dir: Path) -> None:
    own = servers["own"]
    alpaca_ids = tokenize(own, "alpaca", messages=HELLO)
    assert tokenize(own, "lazy-alpaca", messages=HELLO) == alpaca_ids  # first use loads it from --lora-dir
    r = httpx.post(f"{own.base_url}/load_lora_adapter", timeout=120,
                   json={"lora_name": "rt", "lora_path": str(lora_dir / "runtime-alpaca")})
    assert r.status_code == 200, r.text
    assert tokenize(own, "rt", messages=HELLO) == alpaca_ids
    cards = models(own)
    assert cards["lazy-alpaca"]["chat_template"] == cards["rt"]["chat_template"] == "adapter"
    assert chat(own, "rt")["usage"]["prompt_tokens"] == len(alpaca_ids)


def test_lazy_adapter_whose_template_changed_on_disk_is_reread(servers: dict[str, LiveServer], lora_dir: Path) -> None:
    own = servers["own"]
    folder = adapter_folder(lora_dir, "retemplated")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:")
    assert tokenize(own, "retemplated", messages=HELLO) == tokenize(own, BASE_MODEL, prompt="Q: Write a short greeting.\nA:")
    template = folder / "chat_template.jinja"
    template.write_text("{% for m in messages %}User says {{ m['content'] }}{% endfor %}")
    later = template.stat().st_mtime + 5  # a changed mtime even where the file system's clock is coarse
    os.utime(template, (later, later))
    assert tokenize(own, "retemplated", messages=HELLO) == tokenize(own, BASE_MODEL, prompt="User says Write a short greeting.")


def test_malformed_template_at_lazy_load_is_a_400(servers: dict[str, LiveServer]) -> None:
    r = httpx.post(f"{servers['own'].base_url}/chat/completions", timeout=60,
                   json={"model": "broken", "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "broken" in message and "not valid Jinja" in message


def token_ids_of(tokenizer: Any, logprobs: list[dict[str, Any]]) -> list[int]:
    """The ids of generated tokens, from their exact bytes in chat logprobs."""
    texts = TokenTexts(tokenizer)
    by_bytes = {tuple(texts.bytes(i)): i for i in range(len(tokenizer)) if i > 2}  # 0-2: special tokens
    return [by_bytes[tuple(item["bytes"])] for item in logprobs]


def test_adapter_eos_stops_generation(servers: dict[str, LiveServer], lora_dir: Path, tokenizer: Any) -> None:
    """Greedy output of the plain adapter; then the same weights with one of those tokens as EOS in
    generation_config.json (written beside them before their first, lazy, load) stop right there."""
    own = servers["own"]
    reference = chat(own, "plain", max_tokens=8, logprobs=True)
    assert reference["choices"][0]["finish_reason"] == "length"  # the base's EOS ids do not stop it
    ids = token_ids_of(tokenizer, reference["choices"][0]["logprobs"]["content"])
    k = next(i for i in range(1, len(ids) - 1) if ids[i] not in ids[:i])  # a token first seen at step k
    eos_dir = adapter_folder(lora_dir, "plain-eos")
    (eos_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[k]]}))
    stopped = chat(own, "plain-eos", max_tokens=8, logprobs=True)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == k + 1
    assert token_ids_of(tokenizer, stopped["choices"][0]["logprobs"]["content"]) == ids[: k + 1]
    assert models(own)["plain-eos"]["chat_template"] == "base"
    assert chat(own, "plain", max_tokens=8)["usage"]["completion_tokens"] == 8  # other adapters keep their EOS
    assert chat(own, "plain-eos", max_tokens=8, ignore_eos=True)["usage"]["completion_tokens"] == 8


async def _mixed(server: LiveServer) -> list[tuple[str, int]]:
    client = AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    names = [BASE_MODEL, "alpaca", "upper", "lazy-alpaca"] * 3

    async def one(model: str) -> tuple[str, int]:
        r = await client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        assert r.usage is not None
        return r.choices[0].message.content or "", r.usage.prompt_tokens

    return list(await asyncio.gather(*(one(m) for m in names)))


def test_mixed_batch_of_templates_gives_each_request_its_own(servers: dict[str, LiveServer]) -> None:
    own = servers["own"]
    solo = {m: chat(own, m, max_tokens=8) for m in (BASE_MODEL, "alpaca", "upper", "lazy-alpaca")}
    results = asyncio.run(_mixed(own))
    for (text, prompt_tokens), model in zip(results, [BASE_MODEL, "alpaca", "upper", "lazy-alpaca"] * 3, strict=True):
        assert prompt_tokens == solo[model]["usage"]["prompt_tokens"], model
        assert text == solo[model]["choices"][0]["message"]["content"], model


@pytest.mark.parametrize("flags", [("--chat-template", "{% if %}"), ("--lora", "bad={bad}")], ids=["flag", "lora"])
def test_malformed_template_is_a_one_line_startup_error(tmp_path: Path, flags: tuple[str, str]) -> None:
    bad = adapter_folder(tmp_path, "bad")
    (bad / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    cmd = [sys.executable, "-m", "sloth_serve.cli", flags[0], flags[1].replace("{bad}", str(bad))]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert "not valid Jinja" in lines[-1] and ("bad" in lines[-1] or "--chat-template" in lines[-1])
    assert "Traceback" not in done.stderr
