"""Reasoning output and tool calls anywhere, through the real server and the official SDK.

The demo model serves with a Qwen3-style chat template written for these tests (it knows tools and
`<think>`, so the server picks the qwen3 reasoning and hermes tool formats from it). The demo model
cannot think, so each test makes it write a chosen text through the real engine with a regular
expression (vLLM's `structured_outputs` extra): the split, calls and events are then the server's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from live_server import BASE_MODEL, LiveServer, launch
from openai import OpenAI

TEMPLATE = """\
{%- if tools %}<|im_start|>system
Call tools as <tool_call>{"name": ..., "arguments": {...}}</tool_call>:
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- if reasoning_effort is defined %}<|im_start|>system
Reasoning: {{ reasoning_effort }}<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% elif open_think is defined and open_think %}<think>
{% endif %}{% endif %}"""
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
              {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
ASK: Any = [{"role": "user", "content": "Weather in Paris?"}]
PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'


def literal(text: str) -> str:
    """A regular expression matching exactly `text`."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~" else c for c in text)


@pytest.fixture(scope="module")
def thinking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("thinking")
    (tmp / "template.jinja").write_text(TEMPLATE)
    server = launch(tmp, "thinking", "--chat-template", str(tmp / "template.jinja"), demo_adapter=False)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(thinking: LiveServer) -> OpenAI:
    return thinking.client()


def chat(client: OpenAI, text: str, stream: bool = False, **extra: Any) -> Any:
    body = {"structured_outputs": {"regex": literal(text)}, **extra.pop("extra_body", {})}
    return client.chat.completions.create(model=BASE_MODEL, messages=extra.pop("messages", ASK), max_tokens=300,
                                          temperature=0, stream=stream, extra_body=body, **extra)


def streamed(client: OpenAI, text: str, **extra: Any) -> tuple[str, str, list[dict[str, Any]], str | None]:
    """(reasoning, content, calls, finish_reason) reassembled from a stream's deltas."""
    reasoning = content = ""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    order = []
    for chunk in chat(client, text, stream=True, **extra):
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            if delta.get("reasoning_content"):
                reasoning += delta["reasoning_content"]
                order.append("reasoning")
            if delta.get("content"):
                content += delta["content"]
                order.append("content")
            for c in delta.get("tool_calls") or ():
                call = calls.setdefault(c["index"], {"name": "", "arguments": ""})
                call["name"] += c["function"].get("name") or ""
                call["arguments"] += c["function"].get("arguments") or ""
                order.append("call")
            finish = choice.finish_reason or finish
    assert order == sorted(order, key=["reasoning", "content", "call"].index)  # reasoning first, calls last
    return reasoning, content, [calls[i] for i in sorted(calls)], finish


def calls_of(message: Any) -> list[dict[str, Any]]:
    return [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or ()]


def test_reasoning_is_split_from_the_content(client: OpenAI) -> None:
    text = "<think>\nTwo and two.\n</think>\n\nIt is 4."
    r = chat(client, text)
    message = r.choices[0].message
    assert message.reasoning_content == "Two and two." and message.content == "It is 4."
    assert message.model_extra["reasoning"] == "Two and two."
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    assert streamed(client, text) == ("Two and two.", "It is 4.", [], "stop")
    hidden = chat(client, text, extra_body={"include_reasoning": False}).choices[0].message  # vLLM's extra
    assert hidden.content == "It is 4." and "reasoning_content" not in hidden.model_dump(exclude_none=True)


def test_template_kwargs_and_reasoning_effort_reach_the_template(client: OpenAI) -> None:
    # The template opens <think> in the prompt: the output starts inside the reasoning.
    opened = {"extra_body": {"chat_template_kwargs": {"open_think": True}}}
    r = chat(client, "Two and two.\n</think>\n\nIt is 4.", **opened)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Two and two.", "It is 4.")
    plain = chat(client, "It is 4.")
    closed = chat(client, "It is 4.", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert closed.usage.prompt_tokens > plain.usage.prompt_tokens and closed.choices[0].message.content == "It is 4."
    effort = chat(client, "It is 4.", reasoning_effort="low")
    assert effort.usage.prompt_tokens > plain.usage.prompt_tokens
    # An earlier turn's reasoning goes back to the template as reasoning_content.
    turn = {"role": "assistant", "content": "Hi.", "reasoning_content": "Greet back."}
    history = chat(client, "It is 4.", messages=[*ASK, turn, *ASK])
    without = chat(client, "It is 4.", messages=[*ASK, {"role": "assistant", "content": "Hi."}, *ASK])
    assert history.usage.prompt_tokens > without.usage.prompt_tokens


def test_tool_call_after_text(client: OpenAI) -> None:
    text = f"Let me check.\n{PARIS}"
    r = chat(client, text, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    assert calls_of(choice.message) == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert choice.message.tool_calls[0].id.startswith("call_")
    assert streamed(client, text, tools=TOOLS) == ("", "Let me check.\n", calls_of(choice.message), "tool_calls")


def test_two_tool_calls_after_reasoning(client: OpenAI) -> None:
    text = f"<think>\nNeed both.\n</think>\n\n{PARIS}\n{ADD}"
    r = chat(client, text, tools=TOOLS)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.reasoning_content == "Need both."
    assert message.content is None
    expected = [{"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "add", "arguments": '{"a": 1}'}]
    assert calls_of(message) == expected
    assert streamed(client, text, tools=TOOLS) == ("Need both.", "", expected, "tool_calls")


def test_responses_api_gives_reasoning_items_and_calls(client: OpenAI) -> None:
    text = f"<think>\nNeed the weather.\n</think>\n\nChecking.\n{PARIS}"
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    body = {"structured_outputs": {"regex": literal(text)}}
    r = client.responses.create(model=BASE_MODEL, input="Weather in Paris?", tools=tools, temperature=0,
                                max_output_tokens=300, extra_body=body)
    assert [item.type for item in r.output] == ["reasoning", "message", "function_call"]
    assert r.output[0].content[0].text == "Need the weather." and r.output_text == "Checking.\n"
    assert (r.output[2].name, json.loads(r.output[2].arguments)) == ("get_weather", {"city": "Paris"})
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(model=BASE_MODEL, input="Weather in Paris?", tools=tools, temperature=0,
                                          max_output_tokens=300, extra_body=body, stream=True))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == "Need the weather."
    done = events[-1]
    assert done.type == "response.completed"
    assert [item.type for item in done.response.output] == ["reasoning", "message", "function_call"]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_bad_template_kwargs_are_400(thinking: LiveServer) -> None:
    r = httpx.post(f"{thinking.base_url}/chat/completions", timeout=30,
                   json={"messages": ASK, "chat_template_kwargs": {"add_generation_prompt": False}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    r = httpx.post(f"{thinking.base_url}/chat/completions", timeout=30,
                   json={"messages": ASK, "structured_outputs": {"regex": "("}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.regex"


@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_is_written_in_the_templates_format(client: OpenAI, stream: bool) -> None:
    # The template teaches <tool_call> blocks: the grammar forces one there (after any reasoning).
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=BASE_MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=120,
                                       temperature=0, stream=stream)
    if stream:
        reasoning = content = ""
        arguments, name, finish = "", "", None
        for chunk in r:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
            for c in delta.tool_calls or ():
                name += c.function.name or ""
                arguments += c.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    else:
        message = r.choices[0].message
        content, finish = message.content or "", r.choices[0].finish_reason
        name, arguments = message.tool_calls[0].function.name, message.tool_calls[0].function.arguments
    assert finish == "tool_calls" and name == "get_weather" and content == ""
    assert isinstance(json.loads(arguments)["city"], str)


def test_response_format_applies_after_the_reasoning(client: OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "w", "schema": {**WEATHER, "properties": {
        "city": {"type": "string", "maxLength": 8}}}}}
    # Thinking switched off by the template: the JSON starts at once.
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    r = client.chat.completions.create(model=BASE_MODEL, messages=ASK, response_format=fmt, max_tokens=120,
                                       temperature=0, extra_body=off)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or "")["city"], str)
