"""The Responses API (`/v1/responses`) through the official SDK against the live demo model: plain
text equals the chat endpoint's greedy text, instructions, both streaming styles (events in order,
text = deltas), json_schema output, forced tool calls and their round trip, max_output_tokens ->
incomplete, the adapter by name, and the store-less refusals (previous_response_id, GET by id)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from live_server import BASE_MODEL, LiveServer
from openai import OpenAI

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
# A tiny schema: its grammar ends the output in a few tokens, so the response completes.
FLAG_FORMAT: Any = {"format": {"type": "json_schema", "name": "flag", "schema": FLAG}}
TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "description": "Current weather", "parameters": WEATHER}]
ASK = "What is the weather in Paris?"


def greedy_chat(client: OpenAI, messages: list[dict[str, str]], model: str = BASE_MODEL) -> str:
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    return r.choices[0].message.content or ""


def test_plain_response_equals_the_chat_endpoints_greedy_text(client: OpenAI) -> None:
    r = client.responses.create(model=BASE_MODEL, input="Tell me a story", temperature=0, max_output_tokens=16)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text
    assert r.output_text == greedy_chat(client, [{"role": "user", "content": "Tell me a story"}])
    assert r.usage is not None and r.usage.output_tokens > 0 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.output[0].type == "message" and r.output[0].role == "assistant"


def test_instructions_and_message_items_become_the_system_and_user_messages(client: OpenAI) -> None:
    items: Any = [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}]
    r = client.responses.create(model=BASE_MODEL, instructions="Be brief.", input=items, temperature=0,
                                max_output_tokens=12)
    expected = greedy_chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert r.output_text == expected[: len(r.output_text)] and r.output_text == expected
    assert r.instructions == "Be brief."


def test_max_output_tokens_cut_makes_an_incomplete_response(client: OpenAI) -> None:
    r = client.responses.create(model=BASE_MODEL, input="Tell me a story", temperature=0, max_output_tokens=3,
                                extra_body={"ignore_eos": True})
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 3


def test_create_stream_sends_the_typed_events_in_order(client: OpenAI) -> None:
    kwargs: Any = {"model": BASE_MODEL, "input": "Is it raining?", "temperature": 0, "max_output_tokens": 32,
                   "text": FLAG_FORMAT}
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response  # type: ignore[union-attr]
    assert text == done.text == final.output_text == client.responses.create(**kwargs).output_text
    jsonschema.validate(json.loads(text), FLAG)
    assert final.usage is not None and final.usage.output_tokens > 0


def test_a_stream_cut_by_max_output_tokens_ends_with_response_incomplete(client: OpenAI) -> None:
    events = list(client.responses.create(model=BASE_MODEL, input="Tell me a story", max_output_tokens=4,
                                          extra_body={"ignore_eos": True}, stream=True))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete" and final.usage.output_tokens == 4


def test_stream_helper_gives_the_final_response(client: OpenAI) -> None:
    with client.responses.stream(model=BASE_MODEL, input="Is it raining?", temperature=0, max_output_tokens=32,
                                 text=FLAG_FORMAT) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas) != ""


def test_json_schema_text_format_output_validates(client: OpenAI) -> None:
    for seed in range(3):
        r = client.responses.create(
            model=BASE_MODEL, input="Describe a person", temperature=1.0, max_output_tokens=120,
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
            extra_body={"seed": seed},
        )
        jsonschema.validate(json.loads(r.output_text), PERSON)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_tool_choice_yields_a_valid_function_call(client: OpenAI, choice: Any) -> None:
    r = client.responses.create(model=BASE_MODEL, input=ASK, tools=TOOLS, tool_choice=choice, temperature=1.0,
                                max_output_tokens=100, parallel_tool_calls=False)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    # The round trip: the call and its output sent back as input items are accepted.
    follow = client.responses.create(
        model=BASE_MODEL, temperature=0, max_output_tokens=8,
        input=[{"role": "user", "content": ASK}, calls[0].model_dump(exclude_none=True),  # type: ignore[list-item]
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'}],
    )
    assert follow.status in ("completed", "incomplete") and follow.output


def test_streamed_function_call_arguments_match_the_done_event(client: OpenAI) -> None:
    events = list(client.responses.create(model=BASE_MODEL, input=ASK, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, temperature=1.0, max_output_tokens=100,
                                          stream=True))
    dones = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(dones) == 1
    for done in dones:
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta" and e.item_id == done.item_id]
        assert "".join(deltas) == done.arguments
        jsonschema.validate(json.loads(done.arguments), WEATHER)
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_adapter_model_name_uses_the_adapter(client: OpenAI) -> None:
    r = client.responses.create(model="upper", input="Tell me a story", temperature=0, max_output_tokens=12)
    assert r.model == "upper"
    assert r.output_text == greedy_chat(client, [{"role": "user", "content": "Tell me a story"}], model="upper")


def test_previous_response_id_is_a_400_saying_nothing_is_stored(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=BASE_MODEL, input="Hi", previous_response_id="resp_123")
    assert "previous_response_id" in str(err.value) and "store" in str(err.value)


def test_retrieving_a_response_is_a_404_saying_responses_are_not_stored(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve("resp_123")
    assert "not stored" in str(err.value)


@pytest.mark.parametrize(("body", "param"), [
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
    # the demo model takes text only: the image is refused by name (chat's messages[i] read as input)
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.content[0].image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "x"}]}]}, "input[0].content[0].type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": TOOLS}, "tool_choice"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_unsupported_or_bad_fields_are_400s_naming_them(server: LiveServer, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{server.url}/v1/responses", json={"model": BASE_MODEL, "input": "Hi", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
