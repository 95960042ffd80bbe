"""Requests that used to kill the engine or make a 500 are 400s naming the field, and the server
serves the next request: seeds outside [0, 2**63) (the engine died on 2**64, below -2**63, and on
2**64 - 1 with n = 2), numbers that are not finite, lone UTF-16 surrogates in a prompt, a message, a
model name or /tokenize, and JSON schemas nested deeper or larger than the stated limits."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from live_server import BASE_MODEL, LiveServer
from openai import OpenAI

from sloth_serve.api.protocol import MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH

CHAT = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def post_raw(server: LiveServer, path: str, body: str) -> httpx.Response:
    """`body` sent as written: JSON can spell a lone surrogate ("\\ud800") or NaN, which clients
    that encode strictly refuse to send."""
    return httpx.post(f"{server.url}{path}", content=body.encode("ascii"),
                      headers={**server.headers(), "content-type": "application/json"}, timeout=60)


def error_400(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    return error  # type: ignore[no-any-return]


def assert_serving(server: LiveServer) -> None:
    """The engine is alive and a normal request succeeds."""
    assert server.health()["status"] == "ok"
    reply = server.client().completions.create(model=BASE_MODEL, prompt="Return the", max_tokens=4,
                                               extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage and reply.usage.completion_tokens == 4


@pytest.mark.parametrize(("seed", "n"), [(2**64, 1), (-(2**63) - 1, 1), (2**64 - 1, 2), (2**63, 1), (-1, 1)])
def test_a_seed_outside_63_bits_is_a_400_and_the_engine_lives(server: LiveServer, seed: int, n: int) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        server.client().completions.create(model=BASE_MODEL, prompt="hi", max_tokens=3, n=n, seed=seed)
    assert err.value.status_code == 400 and err.value.param == "seed"
    assert "9223372036854775807" in err.value.message
    assert_serving(server)


def test_with_async_scheduling_the_seed_that_killed_the_engine_is_a_400_too(ahead_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ahead_server.client().completions.create(model=BASE_MODEL, prompt="hi", max_tokens=3, n=2, seed=2**64 - 1)
    assert err.value.param == "seed"
    assert_serving(ahead_server)


def test_seeds_near_the_top_wrap_per_choice(server: LiveServer) -> None:
    """Choice j samples with (seed + j) mod 2**63: the choice after 2**63 - 1 samples as seed 0."""
    client = server.client()
    top = client.completions.create(model=BASE_MODEL, prompt="The", max_tokens=6, n=2, seed=2**63 - 1, temperature=1)
    zero = client.completions.create(model=BASE_MODEL, prompt="The", max_tokens=6, seed=0, temperature=1)
    assert len(top.choices) == 2 and all(c.finish_reason in ("length", "stop") for c in top.choices)
    assert top.choices[1].text == zero.choices[0].text
    assert_serving(server)


@pytest.mark.parametrize(("field", "literal"), [
    ("temperature", "NaN"), ("top_p", "NaN"), ("repetition_penalty", "Infinity"),
    ("presence_penalty", "-Infinity"), ("min_p", "NaN"),
])
def test_numbers_that_are_not_finite_are_a_400(server: LiveServer, field: str, literal: str) -> None:
    body = json.dumps({"model": BASE_MODEL, "prompt": "hi", "max_tokens": 3}).replace("}", f', "{field}": {literal}}}')
    error = error_400(post_raw(server, "/v1/completions", body))
    assert error["param"] == field and "finite" in error["message"]
    assert_serving(server)


@pytest.mark.parametrize(("change", "param"), [
    ({"top_k": -2}, "top_k"), ({"n": 129}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"min_tokens": 10**24}, "min_tokens"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [10**24]}, "stop_token_ids"), ({"prompt": [1, 2, 10**24]}, "prompt"),
    ({"prompt": [[5, 6], [-1]]}, "prompt[1]"), ({"logit_bias": {str(10**24): 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"timeout": 0}, "timeout"), ({"max_tokens": 10**24}, "prompt"),
])
def test_numbers_out_of_range_are_a_400_naming_the_field(server: LiveServer, change: dict, param: str) -> None:
    body = {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 3, **change}
    error = error_400(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60))
    assert error["param"] == param


def test_a_timeout_past_any_clock_is_served(server: LiveServer) -> None:
    body = {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 3, "timeout": 1e308}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", '{"prompt": "hi \\ud800", "max_tokens": 3}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "hi \\udc00 there"], "max_tokens": 3}', "prompt[1]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 3}',
     "messages[0].content"),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}], "max_tokens": 3}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', "stop[0]"),
    ("/v1/completions", '{"model": "x\\ud800", "prompt": "hi", "max_tokens": 3}', "model"),
    ("/tokenize", '{"prompt": "hi \\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    ("/detokenize", '{"model": "\\ud800", "tokens": [1]}', "model"),
])
def test_a_lone_surrogate_is_a_400_naming_where(server: LiveServer, path: str, body: str, param: str) -> None:
    error = error_400(post_raw(server, path, body))
    assert error["param"] == param and "surrogate" in error["message"]
    assert_serving(server)


def test_a_surrogate_pair_is_text(server: LiveServer) -> None:
    body = '{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 3}'
    assert post_raw(server, "/v1/chat/completions", body).status_code == 200
    tokens = post_raw(server, "/tokenize", '{"prompt": "smile \\ud83d\\ude00"}')
    assert tokens.status_code == 200 and tokens.json()["count"] > 1


def nested_object(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def with_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def test_a_schema_nested_300_levels_is_a_400_stating_the_limit(client: OpenAI, server: LiveServer) -> None:
    for body, param in [
        (with_schema(nested_object(300)), "response_format.json_schema.schema"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": nested_object(300)}}]},
         "tools[0].function.parameters"),
    ]:
        error = error_400(httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60))
        assert error["param"] == param and f"at most {MAX_SCHEMA_DEPTH}" in error["message"]
    # Within the limit (each object level is two: the schema and its "properties") it is served.
    within = httpx.post(f"{server.url}/v1/chat/completions", json=with_schema(nested_object(MAX_SCHEMA_DEPTH // 2 - 1)),
                        timeout=60)
    assert within.status_code == 200, within.text
    assert_serving(server)


def test_an_absurdly_large_schema_is_a_400_stating_the_limit(server: LiveServer) -> None:
    properties = {f"p{i}": {"type": "string", "enum": [f"v{j}" for j in range(20)]} for i in range(3000)}
    schema = {"type": "object", "properties": properties}
    assert len(json.dumps(schema, separators=(",", ":"))) > MAX_SCHEMA_CHARS
    error = error_400(httpx.post(f"{server.url}/v1/chat/completions", json=with_schema(schema), timeout=60))
    assert error["param"] == "response_format.json_schema.schema" and str(MAX_SCHEMA_CHARS) in error["message"]
    half = {"type": "object", "properties": dict(list(properties.items())[:600])}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": half}} for i in range(3)]
    error = error_400(httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "tools": tools}, timeout=60))
    assert error["param"] == "tools" and "together" in error["message"]
    assert_serving(server)
