"""Reasoning and tool-call formats read from text: every family's format, text before / between /
after calls, calls after reasoning, and a stream cut at every character boundary reads exactly as
the whole text does."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sloth_serve.api.output_reader import OutputFormat, OutputPlan, OutputReader, output_format
from sloth_serve.api.tool_call_reader import merge_deltas
from sloth_serve.api.tool_formats import HERMES, LLAMA3_JSON, MISTRAL
from sloth_serve.api.tool_request import ToolPlan

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("get_weather", "add")]
AUTO = ToolPlan(TOOLS, "auto")
QWEN3 = OutputFormat("qwen3", HERMES)
R1 = OutputFormat("deepseek_r1", HERMES)
HARMONY = OutputFormat("harmony", None)

Read = tuple[str, str, list[tuple[str, Any]], str | None]


def read(fmt: OutputFormat, pieces: list[str], plan: ToolPlan | None = AUTO, prompt_tail: str = "",
         finish: str = "stop") -> Read:
    """(reasoning, content, [(name, arguments)], finish_reason) of the text fed in these pieces."""
    reader = OutputReader(fmt, plan, prompt_tail)
    readings = [reader.feed(p) for p in pieces] + [reader.finish(finish)]
    calls = merge_deltas([d for r in readings for d in r.tool_calls])
    assert all(c["id"].startswith("call_") for c in calls)
    return ("".join(r.reasoning for r in readings), "".join(r.content for r in readings),
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls], readings[-1].finish_reason)


def assert_any_split_reads_the_same(fmt: OutputFormat, text: str, expected: Read, **kw: Any) -> None:
    assert read(fmt, [text], **kw) == expected
    assert read(fmt, list(text), **kw) == expected  # one character at a time
    for cut in range(1, len(text)):
        assert read(fmt, [text[:cut], text[cut:]], **kw) == expected, cut


CASES = [
    (QWEN3, "<think>\nThe user wants weather.\n</think>\n\nSure, checking.\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
            '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     ("The user wants weather.", "Sure, checking.\n", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})],
      "tool_calls")),
    (QWEN3, "No thinking <here>, a < b.", ("", "No thinking <here>, a < b.", [], "stop")),
    (QWEN3, '<think>x</think><tool_call>{"name": "nope", "arguments": {}}</tool_call> done',
     ("x", '<tool_call>{"name": "nope", "arguments": {}}</tool_call> done', [], "stop")),
    (OutputFormat(None, LLAMA3_JSON), 'Let me see. <|python_tag|>{"name": "add", "parameters": {"a": 1}}; '
                                      '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
     ("", "Let me see. ", [("add", {"a": 1}), ("get_weather", {"city": "Oslo"})], "tool_calls")),
    (OutputFormat(None, LLAMA3_JSON), '{"name": "add", "parameters": {"a": 2}}', ("", "", [("add", {"a": 2})], "tool_calls")),
    (OutputFormat(None, MISTRAL), 'Ok.[TOOL_CALLS][{"name": "add", "arguments": {"a": 3}}]',
     ("", "Ok.", [("add", {"a": 3})], "tool_calls")),
    (OutputFormat(None, MISTRAL), '[TOOL_CALLS]add[ARGS]{"a": 4}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}',
     ("", "", [("add", {"a": 4}), ("get_weather", {"city": "Rome"})], "tool_calls")),
    (HARMONY, "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
              'to=functions.get_weather <|constrain|>json<|message|>{"city": "Lima"}<|call|>',
     ("Need the weather.", "", [("get_weather", {"city": "Lima"})], "tool_calls")),
    (HARMONY, "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.<|return|>",
     ("Easy.", "It is 4.", [], "stop")),
]


@pytest.mark.parametrize(("fmt", "text", "expected"), CASES)
def test_format_reads_the_same_however_the_stream_is_cut(fmt: OutputFormat, text: str, expected: Read) -> None:
    assert_any_split_reads_the_same(fmt, text, expected)


def test_prompt_that_opens_think_starts_the_output_in_reasoning() -> None:
    text = "Two plus two.\n</think>\n\nFour."
    assert_any_split_reads_the_same(QWEN3, text, ("Two plus two.", "Four.", [], "stop"), prompt_tail="assistant\n<think>\n")
    # enable_thinking false: the template closes an empty reasoning section itself
    assert read(QWEN3, ["Four."], prompt_tail="<think>\n\n</think>\n\n") == ("", "Four.", [], "stop")
    assert read(R1, ["cut short in thought"], finish="length") == ("cut short in thought", "", [], "length")
    assert read(QWEN3, ["<think>cut short"], finish="length") == ("cut short", "", [], "length")


def test_content_streams_and_only_a_possible_marker_is_held_back() -> None:
    reader = OutputReader(QWEN3, AUTO)
    assert reader.feed("Hello <").content == "Hello "
    assert reader.feed("b>").content == "<b>"
    assert reader.feed(" then <tool_").content == " then "
    reading = reader.feed('call>{"name": "add", "arguments": {}}</tool_call>')
    assert reading.content == "" and reading.tool_calls[0]["function"]["name"] == "add"


def test_template_picks_the_formats_and_flags_override_it() -> None:
    assert output_format("{{ '<think>' }}<tool_call>") == OutputFormat("qwen3", HERMES, native_tools=True)
    assert output_format("<|start_header_id|> <|python_tag|>") == OutputFormat(None, LLAMA3_JSON, native_tools=True)
    assert output_format("[TOOL_CALLS] [ARGS]") == OutputFormat(None, MISTRAL, native_tools=True)
    assert output_format("<|start|>{{ x }}<|channel|>").is_harmony
    assert output_format(None) == OutputFormat(None, HERMES)  # the generic prompt's bare JSON: not native
    assert output_format("<think>", "none", "mistral") == OutputFormat(None, MISTRAL, native_tools=True)
    assert output_format("", "deepseek_r1") == OutputFormat("deepseek_r1", HERMES)


def test_without_tools_calls_stay_content() -> None:
    text = '<think>a</think><tool_call>{"name": "add", "arguments": {}}</tool_call>'
    assert read(QWEN3, [text], plan=None) == ("a", '<tool_call>{"name": "add", "arguments": {}}</tool_call>', [], "stop")


def test_grammars_leave_room_for_reasoning_only_where_the_prompt_allows_it() -> None:
    assert OutputPlan(QWEN3, None, "<|im_start|>assistant\n").think == "optional"
    assert OutputPlan(QWEN3, None, "assistant\n<think>\n").think == "open"
    assert OutputPlan(QWEN3, None, "assistant\n<think>\n\n</think>\n\n").think is None  # enable_thinking false
    assert OutputPlan(OutputFormat(None, HERMES), None, "assistant\n").think is None
    assert OutputPlan(HARMONY, None, "").think is None


def test_harmony_markers_survive_detokenization_token_by_token() -> None:
    from transformers import AutoTokenizer

    from sloth_serve.api.detokenizer import IncrementalDetokenizer
    from sloth_serve.api.output_reader import marker_token_ids
    from sloth_serve.loader import DEMO_MODEL

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    markers = ["<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|call|>", "<|return|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    text = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "Lima"}<|call|>')
    ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    keep = marker_token_ids(tokenizer, HARMONY)
    assert len(keep) == len(markers)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True, keep=keep)
    streamed = "".join(detok.add([t]) for t in ids) + detok.flush()
    assert streamed == text  # markers kept, <|endoftext|> (special, not a marker) dropped
    plain = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    assert "<|channel|>" not in "".join(plain.add([t]) for t in ids) + plain.flush()
    assert read(HARMONY, [streamed]) == ("Need the weather.", "", [("get_weather", {"city": "Lima"})], "tool_calls")
