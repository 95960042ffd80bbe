"""Stop strings: matched across token boundaries, the text cut before them, never sent to the client
(streaming or not), and partial matches released when no stop follows."""

from __future__ import annotations

import json

from live_server import BASE_MODEL, LiveServer
from openai import OpenAI
from sse_client import chunks, stream

PROMPT = "The json module"
N = 24  # enough greedy tokens to find a stop string in the middle


def greedy_tokens(client: OpenAI) -> tuple[list[str], str]:
    r = client.completions.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=N, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )
    tokens = r.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert tokens is not None
    return tokens, r.choices[0].text


def straddling_stop(tokens_and_text: tuple[list[str], str]) -> tuple[str, str]:
    """A stop string made of the end of one token and the start of the next (so it can only match
    across a token boundary), and the text the client should get: everything before it."""
    tokens, text = tokens_and_text
    for k in range(2, len(tokens) - 1):
        a, b = tokens[k], tokens[k + 1]
        if len(a.strip()) >= 2 and len(b.strip()) >= 2 and not a.startswith("<|") and not b.startswith("<|"):
            stop = a[-2:] + b[:2]
            return stop, text[: text.find(stop)]
    raise AssertionError(f"no two adjacent multi-character tokens in {tokens}")


def test_stop_string_is_never_sent(client: OpenAI) -> None:
    stop, expected = straddling_stop(greedy_tokens(client))
    r = client.completions.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == expected
    assert stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_streamed_stop_string_is_never_sent(server: LiveServer, client: OpenAI) -> None:
    stop, expected = straddling_stop(greedy_tokens(client))
    body = {
        "model": BASE_MODEL, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stop": stop,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    events = stream(f"{server.base_url}/completions", body)
    parsed = chunks(events)
    assert "".join(c["choices"][0]["text"] for c in parsed) == expected
    assert all(stop not in e for e in events)
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stop_string_cuts_the_answer(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "What does `json.dumps` do?"}]
    full = client.chat.completions.create(model=BASE_MODEL, messages=messages, max_tokens=20, temperature=0)  # type: ignore[arg-type]
    text = full.choices[0].message.content or ""
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    parts = []
    for chunk in client.chat.completions.create(
        model=BASE_MODEL, messages=messages, max_tokens=20, temperature=0, stop=stop, stream=True  # type: ignore[arg-type]
    ):
        parts += [c.delta.content or "" for c in chunk.choices]
        assert all(stop not in json.dumps(c.model_dump()) for c in chunk.choices)
    assert "".join(parts) == text[: text.find(stop)]


def test_text_resembling_a_stop_prefix_is_released_at_the_end(client: OpenAI) -> None:
    plain = client.completions.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    text = plain.choices[0].text
    stop = text[-3:] + "\u2603never"  # its start is the output's tail, so the tail is held back
    r = client.completions.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=stop, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == "length"
