"""Auto-mode tool calls stream as OpenAI's do: the name as soon as the call's start is certain, then
fragments of the arguments; the fragments of any split of the text join into the whole response's
arguments, and calls written another way are still read whole."""

from __future__ import annotations

from typing import Any

import pytest

from sloth_serve.api.call_stream import MORE, call_header
from sloth_serve.api.output_reader import OutputFormat, OutputReader
from sloth_serve.api.tool_call_reader import merge_deltas
from sloth_serve.api.tool_formats import HERMES, LLAMA3_JSON, MISTRAL
from sloth_serve.api.tool_request import ToolPlan

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("get_weather", "add")]
AUTO = ToolPlan(TOOLS, "auto")
NAMES = ["get_weather", "add"]
ARGS = '{"city": "Par}is \\"x\\"", "days": [1, {"n": 2}]}'


def whole_and_streamed(fmt: OutputFormat, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[dict[str, Any]]]:
    reader = OutputReader(fmt, AUTO)
    readings = [reader.feed(p) for p in pieces] + [reader.finish("stop")]
    deltas = [d for r in readings for d in r.tool_calls]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in merge_deltas(deltas)]
    return "".join(r.content for r in readings), calls, deltas


CASES = [
    (OutputFormat(None, HERMES), f'Sure.<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>',
     "Sure.", [("get_weather", ARGS)]),
    (OutputFormat(None, LLAMA3_JSON), f'<|python_tag|>{{"name": "add", "parameters": {{"a": 1}}}}; '
                                      f'{{"name": "get_weather", "parameters": {ARGS}}}',
     "", [("add", '{"a": 1}'), ("get_weather", ARGS)]),
    (OutputFormat(None, MISTRAL), f'Ok.[TOOL_CALLS][{{"name": "add", "arguments": {ARGS}}}]', "Ok.", [("add", ARGS)]),
    (OutputFormat(None, HERMES), f'[{{"name": "add", "arguments": {ARGS}}}, {{"name": "add", "arguments": {{}}}}]',
     "", [("add", ARGS), ("add", "{}")]),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_streamed_arguments_join_into_the_whole_responses(fmt: OutputFormat, text: str, content: str,
                                                          calls: list[tuple[str, str]]) -> None:
    assert whole_and_streamed(fmt, [text])[:2] == (content, calls)
    for cut in range(1, len(text)):
        assert whole_and_streamed(fmt, [text[:cut], text[cut:]])[:2] == (content, calls), cut
    _, streamed, deltas = whole_and_streamed(fmt, list(text))
    assert streamed == calls
    # one character at a time: the name comes first (with the arguments' opening brace), then the
    # rest of the arguments a fragment per character
    first = deltas[0]
    assert first["function"] == {"name": calls[0][0], "arguments": "{"} and first["id"].startswith("call_")
    assert sum(1 for d in deltas if d["index"] == 0 and "id" not in d) == len(calls[0][1]) - 1


def test_the_name_is_sent_before_the_arguments_are_complete() -> None:
    reader = OutputReader(OutputFormat(None, HERMES), AUTO)
    assert reader.feed('Hi <tool_call>{"name": "add", "arg').tool_calls == []
    started = reader.feed('uments": {"a": ').tool_calls
    assert [c["function"] for c in started] == [{"name": "add", "arguments": '{"a": '}]
    assert reader.feed("12").tool_calls == [{"index": 0, "function": {"arguments": "12"}}]
    assert reader.feed("}}</tool_call>").tool_calls == [{"index": 0, "function": {"arguments": "}"}}]
    assert reader.finish("stop").finish_reason == "tool_calls"


@pytest.mark.parametrize("text", [
    '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>',  # keys in another order
    '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>',  # arguments as a string
    '{"arguments": {"a": 1}, "name": "add"}',
])
def test_calls_written_otherwise_are_still_read_whole(text: str) -> None:
    for cut in range(1, len(text)):
        assert whole_and_streamed(OutputFormat(None, HERMES), [text[:cut], text[cut:]])[:2] == ("", [("add", '{"a": 1}')])


def test_regions_that_are_not_calls_stay_text() -> None:
    text = '<tool_call>{"name": "nope", "arguments": {}}</tool_call> and {"name": "add"}'
    assert whole_and_streamed(OutputFormat(None, HERMES), list(text))[:2] == (text, [])
    assert whole_and_streamed(OutputFormat(None, HERMES), ['{"answer": 42}'])[:2] == ('{"answer": 42}', [])


def test_call_header_knows_when_it_cannot_be_a_call() -> None:
    assert call_header('{"name": "ad', 0, NAMES) == MORE
    assert call_header('{"name": "ax', 0, NAMES) is None
    assert call_header('{"name": "add", "param', 0, NAMES) == MORE
    assert call_header('{"name": "add", "arguments": "', 0, NAMES) is None
    text = ' {"name" : "add" ,"arguments":{}'
    assert call_header(text, 0, NAMES) == ("add", text.rindex("{"))
