"""Structured output through the official client against the live demo model: JSON-schema and JSON
mode outputs parse and validate at temperature 1 over many seeds, forced tool calls are well formed
and their arguments validate, streamed calls reassemble into the whole response's calls, free
requests keep their tokens beside constrained ones, and bad schemas or tool settings are 400s."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import pytest
from live_server import BASE_MODEL, LiveServer
from openai import AsyncOpenAI, OpenAI

from sloth_serve.api.tool_call_reader import ToolCallReader, merge_deltas
from sloth_serve.api.tool_request import ToolPlan

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "address", "tags"],
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def chat(client: OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", ASK)
    return client.chat.completions.create(model=BASE_MODEL, temperature=1.0, max_tokens=200, **kwargs)


def post(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    body = {"model": BASE_MODEL, "messages": ASK, "max_tokens": 8, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def assert_valid_call(call: Any) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_json_schema_output_always_validates_at_temperature_one(client: OpenAI) -> None:
    # n=16 with a seed: choice j samples with seed j, all in one engine batch.
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = chat(client, messages=[{"role": "user", "content": "Describe a person as JSON."}], n=16, seed=0, response_format=fmt)
    assert len({c.message.content for c in r.choices}) > 8  # really different samples
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_object_mode_yields_objects(client: OpenAI) -> None:
    messages = [{"role": "user", "content": 'Reply with a JSON object like {"a": 1}.'}]
    r = chat(client, messages=messages, n=8, seed=0, response_format={"type": "json_object"})
    finished = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert len(finished) >= 4  # the others ran into max_tokens inside a long string
    for text in finished:
        assert isinstance(json.loads(text), dict)
    assert all(c.message.content.startswith("{") for c in r.choices)


def test_required_tool_choice_always_yields_one_valid_call(client: OpenAI) -> None:
    r = chat(client, n=12, seed=0, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert c.message.tool_calls is not None and len(c.message.tool_calls) == 1
        assert_valid_call(c.message.tool_calls[0])
    assert len({c.message.tool_calls[0].function.arguments for c in r.choices}) > 6  # really different samples


def test_required_tool_choice_with_parallel_calls_yields_valid_calls(client: OpenAI) -> None:
    r = chat(client, n=4, seed=0, tools=TOOLS, tool_choice="required")
    for c in r.choices:
        calls = c.message.tool_calls or []
        assert calls
        # A weak model may go on listing calls until max_tokens; every whole call still validates.
        whole = calls if c.finish_reason == "tool_calls" else calls[:-1]
        assert c.finish_reason in ("tool_calls", "length")
        for call in whole:
            assert_valid_call(call)


def test_named_tool_choice_calls_that_function(client: OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "add"}}
    r = chat(client, n=6, seed=0, tools=TOOLS, tool_choice=choice)
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        (call,) = c.message.tool_calls
        assert call.function.name == "add"
        assert_valid_call(call)


def test_streamed_tool_calls_reassemble_into_the_whole_response(client: OpenAI) -> None:
    kwargs = {"seed": 7, "tools": TOOLS, "tool_choice": "required"}
    whole = chat(client, **kwargs).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chat(client, stream=True, **kwargs):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                if d.id is not None:  # the first delta of a call: id and name
                    assert d.function.name and not call["name"]
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    expected = [{"name": t.function.name, "arguments": t.function.arguments} for t in whole.message.tool_calls]
    assert [calls[i] for i in sorted(calls)] == expected
    assert finish == whole.finish_reason


def test_free_requests_keep_their_tokens_beside_constrained_ones(server: LiveServer) -> None:
    prompts = ["The json module", "Return the path", "A socket object"]

    async def free(client: AsyncOpenAI, prompt: str) -> str:
        r = await client.completions.create(model=BASE_MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.choices[0].text

    async def constrained(client: AsyncOpenAI, seed: int) -> None:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        await client.chat.completions.create(model=BASE_MODEL, messages=ASK, max_tokens=200, seed=seed,
                                             response_format=fmt)

    async def run(with_constrained: bool) -> list[str]:
        async with AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
            others = [constrained(client, s) for s in range(4)] if with_constrained else []
            results = await asyncio.gather(*others, *(free(client, p) for p in prompts))
            return list(results[len(others):])

    alone = asyncio.run(run(False))
    assert asyncio.run(run(True)) == alone


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
         "response_format.json_schema.schema", "objekt"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
         "response_format.json_schema.schema", "uniqueItems"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["a"]}}}]},
         "tools[0].function.parameters", "Unsatisfiable"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "unique"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "pattern"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, None, "ignore_eos"),
    ],
)
def test_bad_structured_requests_are_400s_naming_the_problem(
    server: LiveServer, body: dict[str, Any], param: str | None, words: str
) -> None:
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_text_format_tool_history_and_auto_are_accepted(server: LiveServer) -> None:
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]  # fmt: skip
    for body in ({"response_format": {"type": "text"}}, {"messages": history, "tools": TOOLS, "tool_choice": "auto"},
                 {"tools": TOOLS, "tool_choice": "none", "parallel_tool_calls": False}):
        r = post(server, body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


# --- the tool-call reader alone (no server) -------------------------------------------------------


def read(plan: ToolPlan, pieces: list[str], finish: str = "stop") -> tuple[str, list[dict[str, Any]], str | None]:
    reader = ToolCallReader(plan)
    readings = [reader.feed(p) for p in pieces] + [reader.finish(finish)]
    deltas = [d for r in readings for d in r.tool_calls]
    return "".join(r.content for r in readings), merge_deltas(deltas), readings[-1].finish_reason


def test_reader_gives_the_same_calls_however_the_text_is_split() -> None:
    plan = ToolPlan(TOOLS, "required")
    text = '[{"name": "add", "arguments": {"a": 1, "b": {"c": "}]\\""}}}, {"name": "get_weather", "arguments": {}}]'
    whole = read(plan, [text])
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole[1]] == [
        ("add", '{"a": 1, "b": {"c": "}]\\""}}'), ("get_weather", "{}")]
    assert whole[2] == "tool_calls"
    for cut in range(1, len(text)):
        _, calls, finish = read(plan, [text[:cut], text[cut:]])
        assert [c["function"] for c in calls] == [c["function"] for c in whole[1]] and finish == "tool_calls"


def test_reader_in_auto_mode_tells_text_from_calls() -> None:
    plan = ToolPlan(TOOLS, "auto")
    assert read(plan, ["It is ", "sunny."]) == ("It is sunny.", [], "stop")
    content, calls, finish = read(plan, ['<tool_call>\n{"name": "add", ', '"arguments": {"a": 1, "b": 2}}\n</tool_call>'])
    assert content == "" and finish == "tool_calls"
    assert calls[0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert read(plan, ['{"name": "unknown", "arguments": {}}'])[0] == '{"name": "unknown", "arguments": {}}'
    assert read(plan, ['[{"name": "add"'], finish="length") == ('[{"name": "add"', [], "length")
