"""Request checks that run before any work, without a server: seeds in [0, 2**63) and wrapped per
choice, lone surrogates found wherever they are (dict keys too) without walking token-id lists,
schema depth measured without recursion, and schema size limits."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from sloth_serve.api.engine_params import choice_requests
from sloth_serve.api.errors import APIError, error_body
from sloth_serve.api.protocol import (
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
    ChatCompletionRequest,
    CompletionRequest,
    check_schema_size,
    check_text,
    may_hold_surrogates,
    schema_depth,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, -(2**63) - 1])
def test_a_seed_outside_0_to_2_63_is_refused_naming_the_range(seed: int) -> None:
    with pytest.raises(ValidationError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        CompletionRequest.model_validate({"prompt": "x", "seed": seed})


def test_choice_seeds_wrap_at_2_63() -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "seed": 2**63 - 1, "n": 3})
    choices = choice_requests(req, "cmpl-1", [([1, 2], 4)], None, 0, vocab_size=100)
    assert [c.params.seed for c in choices] == [2**63 - 1, 0, 1]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "ok \ud800"}, "prompt"),
    ({"prompt": ["ok", "\udc00"]}, "prompt[1]"),
    ({"prompt": "x", "logit_bias": {"\ud800": 1}}, "logit_bias.\\ud800"),
    ({"prompt": "x", "user": "u\udfff"}, "user"),
])
def test_a_lone_surrogate_is_found_where_it_is(body: dict, param: str) -> None:
    with pytest.raises(APIError) as err:
        check_text(CompletionRequest.model_validate(body))
    assert err.value.param == param and "surrogate" in err.value.message


def test_surrogates_in_a_schema_or_a_tool_are_found() -> None:
    schema = {"type": "object", "properties": {"k\ud800": {"type": "string"}}}
    req = ChatCompletionRequest.model_validate(
        {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    with pytest.raises(APIError) as err:
        check_text(req)
    assert err.value.param == "response_format.json_schema.schema.properties.k\\ud800"


def test_valid_text_and_token_ids_pass() -> None:
    check_text(CompletionRequest.model_validate({"prompt": [[1, 2], [3]], "stop": ["\U0001f600", "é"]}))
    check_text(ChatCompletionRequest.model_validate({**CHAT, "messages": [{"role": "user", "content": "ok 😀"}]}))


SURROGATE_BODIES = [
    {"prompt": "ok \ud800"}, {"prompt": ["ok", "\udc00"]}, {"prompt": "x", "logit_bias": {"\ud800": 1}},
    {"prompt": "x", "user": "u\udfff"}, {"prompt": "x", "stop": ["\udbff"]},
]


def _upper_escapes(body: dict) -> bytes:
    return re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m.group(1).upper(), json.dumps(body)).encode()


@pytest.mark.parametrize("body", SURROGATE_BODIES)
@pytest.mark.parametrize("encode", [
    lambda b: json.dumps(b).encode(),  # as \uXXXX escapes
    _upper_escapes,
    lambda b: json.dumps(b, ensure_ascii=False).encode("utf-8", "surrogatepass"),  # as raw bytes
    lambda b: json.dumps(b, ensure_ascii=False).encode("utf-16", "surrogatepass"),
    lambda b: json.dumps(b, ensure_ascii=False).encode("utf-32-le", "surrogatepass"),
], ids=["escaped", "escaped-upper", "utf8-bytes", "utf16", "utf32"])
def test_every_body_that_parses_to_a_lone_surrogate_is_walked(body: dict, encode: Callable[[dict], bytes]) -> None:
    """The scan of the raw body may spare the walk only where json.loads (FastAPI's parser) cannot
    produce a lone surrogate."""
    raw = encode(body)
    assert json.loads(raw) == body
    assert may_hold_surrogates(raw)
    with pytest.raises(APIError, match="surrogate"):
        CompletionRequest.model_validate(json.loads(raw)).check(raw)


@pytest.mark.parametrize(("raw", "scanned_as_possible"), [
    (json.dumps({**CHAT, "stop": ["é", "x"], "logit_bias": {"12": 1.5}}).encode(), False),
    (json.dumps({**CHAT, "messages": [{"role": "user", "content": "ok 😀 ünïcode ☃"}]}, ensure_ascii=False).encode(),
     False),
    # walked though valid: an escaped backslash before "ud800", a pair of escapes (an emoji as ASCII JSON)
    (json.dumps({**CHAT, "user": "\\ud800 is how JSON spells one"}).encode(), True),
    (json.dumps({**CHAT, "stop": ["\U0001f600"]}).encode(), True),
])
def test_bodies_without_lone_surrogates_pass(raw: bytes, scanned_as_possible: bool) -> None:
    assert may_hold_surrogates(raw) is scanned_as_possible
    ChatCompletionRequest.model_validate(json.loads(raw)).check(raw)


def test_an_error_quoting_a_surrogate_can_still_be_written() -> None:
    body = error_body("model 'x\ud800' does not exist", "not_found_error", "model\udfff")
    assert body["error"]["message"] == "model 'x\\ud800' does not exist" and body["error"]["param"] == "model\\udfff"
    assert str(body).encode("utf-8")


def test_schema_depth_needs_no_recursion() -> None:
    deep: object = {}
    for _ in range(100_000):  # far past Python's recursion limit
        deep = [deep]
    assert schema_depth(deep, MAX_SCHEMA_DEPTH) == MAX_SCHEMA_DEPTH + 1
    assert schema_depth({"a": [{"b": 1}], "c": 2}, MAX_SCHEMA_DEPTH) == 3
    with pytest.raises(APIError, match=f"at most {MAX_SCHEMA_DEPTH}"):
        check_schema_size("response_format.json_schema.schema", deep)


def test_schema_size_limit() -> None:
    within = {"enum": ["x" * (MAX_SCHEMA_CHARS - 20)]}
    assert check_schema_size("s", within) <= MAX_SCHEMA_CHARS
    with pytest.raises(APIError, match=f"at most {MAX_SCHEMA_CHARS}"):
        check_schema_size("s", {"enum": ["x" * MAX_SCHEMA_CHARS]})


def test_non_finite_numbers_are_refused() -> None:
    for field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        with pytest.raises(ValidationError, match="finite"):
            CompletionRequest.model_validate({"prompt": "x", field: float("nan")})
