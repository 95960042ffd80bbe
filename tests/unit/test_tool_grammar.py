"""Grammars in the model's own format (server/api/tool_grammar.py), run by llguidance over the demo
tokenizer: forced calls as `<tool_call>` blocks, JSON after a free reasoning section, and what they
refuse."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest
from transformers import AutoTokenizer

from server.api.tool_grammar import shape
from server.api.tools import ToolPlan, call_spec
from server.engine.grammar import GrammarCompiler
from server.engine.sampling_params import StructuredSpec
from server.loader import DEMO_MODEL

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
                               {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ADD = '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def accepts() -> Any:
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])

    def run(spec: StructuredSpec, text: str) -> bool:
        matcher: llguidance.LLMatcher = compiler.compile(spec).deep_copy()
        ok = all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
        return ok and matcher.is_accepting()

    return run


def test_forced_calls_are_tool_call_blocks(accepts: Any) -> None:
    required = ToolPlan(TOOLS, "required")
    spec = shape(call_spec(required), required, hermes=True, think=None)
    assert spec.kind == "lark"
    assert accepts(spec, PARIS) and accepts(spec, f"{PARIS}\n{ADD}")
    assert not accepts(spec, '[{"name": "add", "arguments": {}}]')  # the bare JSON form is not this model's
    assert not accepts(spec, PARIS.replace("Paris", "Paris\", \"x\": \"1"))  # arguments follow the schema
    single = ToolPlan(TOOLS, "required", parallel=False)
    assert not accepts(shape(call_spec(single), single, hermes=True, think=None), f"{PARIS}\n{ADD}")
    named = ToolPlan(TOOLS, "named", "add")
    assert accepts(shape(call_spec(named), named, hermes=True, think=None), ADD)
    assert not accepts(shape(call_spec(named), named, hermes=True, think=None), PARIS)


def test_json_grammar_starts_after_the_reasoning(accepts: Any) -> None:
    schema = StructuredSpec(json.dumps(WEATHER))
    optional = shape(schema, None, hermes=False, think="optional")
    assert accepts(optional, '<think>\nA city </thi nk.\n</think>\n\n{"city": "Oslo"}')
    assert accepts(optional, '{"city": "Oslo"}')
    assert not accepts(optional, 'Sure: {"city": "Oslo"}')
    opened = shape(schema, None, hermes=False, think="open")
    assert accepts(opened, 'Oslo it is.\n</think>\n{"city": "Oslo"}')
    assert not accepts(opened, '{"city": "Oslo"}')  # the prompt opened the reasoning: it must close
    required = ToolPlan(TOOLS, "required")
    assert accepts(shape(call_spec(required), required, hermes=True, think="optional"), f"<think>x</think>{PARIS}")


def test_plain_json_grammar_is_kept_without_reasoning_or_native_format() -> None:
    spec = StructuredSpec(json.dumps(WEATHER))
    assert shape(spec, None, hermes=True, think=None) is spec
    required = ToolPlan(TOOLS, "required")
    assert shape(call_spec(required), required, hermes=False, think=None).kind == "json"
