"""Speculative decoding through the server: `--speculative-model` (a 2-layer draft cut from the demo
model, both loaded in 4-bit) gives the same greedy text, tokens, logprobs and usage as the plain
server, for the base model and the adapter, stops at a stop string as it does, answers a JSON-schema
request (its drafts verified under the grammar) as it does, and reports its acceptance under vLLM's
spec_decode metric names."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest
from live_server import BASE_MODEL, LiveServer, launch
from openai import OpenAI

from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.truncate import truncate_model

PROMPT = "def add(a, b):\n    return a + b\n\ndef add("


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("spec")
    draft = truncate_model(DEMO_MODEL, tmp / "draft", 2)
    server = launch(tmp, "spec", "--speculative-model", str(draft), "--num-speculative-tokens", "3")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def completion(client: OpenAI, model: str, **kw: object) -> tuple[str, list[str], list[float], int, str | None]:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=40, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True}, **kw)  # type: ignore[call-overload]
    choice = r.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and r.usage is not None
    return choice.text, lp.tokens, lp.token_logprobs, r.usage.completion_tokens, choice.finish_reason


@pytest.mark.parametrize("model", [BASE_MODEL, "upper"])
def test_greedy_completion_equals_the_plain_server(client: OpenAI, spec_server: LiveServer, model: str) -> None:
    want = completion(client, model)
    got = completion(spec_server.client(), model)
    assert got[0] == want[0] and got[1] == want[1] and got[3:] == want[3:]
    assert got[2] == pytest.approx(want[2], abs=1e-3)


def test_stop_string_cuts_text_tokens_and_usage_as_without_speculation(client: OpenAI, spec_server: LiveServer) -> None:
    text = completion(client, BASE_MODEL)[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    want = completion(client, BASE_MODEL, stop=[stop])
    got = completion(spec_server.client(), BASE_MODEL, stop=[stop])
    assert got[4] == "stop" and stop not in got[0]
    assert got[0] == want[0] and got[1] == want[1] and got[3] == want[3]


def metric(server: LiveServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert found is not None, f"{name} missing from /metrics"
    return float(found.group(1))


def test_json_schema_answer_equals_the_plain_server(client: OpenAI, spec_server: LiveServer) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "doc": {"type": "string", "maxLength": 120}},
              "required": ["name", "doc"], "additionalProperties": False}

    def ask(c: OpenAI) -> tuple[str | None, int]:
        r = c.chat.completions.create(
            model=BASE_MODEL, messages=[{"role": "user", "content": "Describe `json.dumps` as JSON."}], max_tokens=80,
            temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}})
        assert r.usage is not None
        return r.choices[0].message.content, r.usage.completion_tokens

    drafts = metric(spec_server, "vllm:spec_decode_num_draft_tokens_total")
    got = ask(spec_server.client())
    assert metric(spec_server, "vllm:spec_decode_num_draft_tokens_total") > drafts  # it speculated
    assert got == ask(client)
    assert got[0] is not None and set(json.loads(got[0])) == {"name", "doc"}


def test_metrics_report_drafts_and_accepted_tokens(spec_server: LiveServer) -> None:
    spec_server.client().completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=30, temperature=0)

    def value(name: str) -> float:
        return metric(spec_server, name)

    drafts, draft_tokens = value("vllm:spec_decode_num_drafts_total"), value("vllm:spec_decode_num_draft_tokens_total")
    accepted = value("vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and drafts <= draft_tokens <= 3 * drafts and 0 < accepted <= draft_tokens
    assert value("vllm:spec_decode_num_accepted_tokens_per_pos_total") > 0  # position 0 comes first
