"""Grammars in the model's own format (server/api/tool_grammar.py), run by llguidance over the demo
tokenizer: forced calls as `<tool_call>` blocks, JSON after a free reasoning section, and what they
refuse."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest
from transformers import AutoTokenizer

from sloth_serve.api.detokenizer import IncrementalDetokenizer
from sloth_serve.api.output_reader import OutputFormat, OutputPlan
from sloth_serve.api.tool_call_reader import merge_deltas
from sloth_serve.api.tool_formats import HERMES, LLAMA3_JSON, MISTRAL
from sloth_serve.api.tool_grammar import shape
from sloth_serve.api.tool_request import ToolPlan, call_spec
from sloth_serve.engine.grammar import GrammarCompiler
from sloth_serve.engine.sampling_params import StructuredSpec
from sloth_serve.loader import DEMO_MODEL

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


def test_forced_calls_of_a_llama3_template_are_its_json_calls(accepts: Any) -> None:
    paris = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    add = '{"name": "add", "parameters": {}}'
    required = ToolPlan(TOOLS, "required")
    spec = shape(call_spec(required), required, hermes=False, think=None, family="llama3_json")
    assert spec.kind == "lark"
    assert accepts(spec, paris) and accepts(spec, f"{paris}; {add}")
    assert not accepts(spec, '[{"name": "add", "arguments": {}}]')  # the generic prompt's form is not this model's
    assert not accepts(spec, paris.replace("Paris", "Paris\", \"x\": \"1"))  # arguments follow the schema
    single = ToolPlan(TOOLS, "required", parallel=False)
    assert not accepts(shape(call_spec(single), single, False, None, "llama3_json"), f"{paris}; {add}")
    named = ToolPlan(TOOLS, "named", "add")
    assert accepts(shape(call_spec(named), named, False, None, "llama3_json"), add)
    assert not accepts(shape(call_spec(named), named, False, None, "llama3_json"), paris)


def test_what_a_family_grammar_forces_reads_back_as_the_calls() -> None:
    # the template teaches the family's format; the grammar's output (as accepted above) is read whole
    # and streamed character by character into the same calls
    cases = [(OutputFormat(None, HERMES, native_tools=True), f"{PARIS}\n{ADD}"),
             (OutputFormat(None, LLAMA3_JSON, native_tools=True),
              '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "add", "parameters": {}}')]
    required = ToolPlan(TOOLS, "required")
    for fmt, text in cases:
        plan = OutputPlan(fmt, required).constrained_by(shape(call_spec(required), required, False, None,
                                                              OutputPlan(fmt, required).native_calls))
        assert plan.calls_in_format
        for pieces in ([text], list(text)):
            reader = plan.reader()
            assert reader is not None
            readings = [reader.feed(p) for p in pieces] + [reader.finish("stop")]
            calls = merge_deltas([d for r in readings for d in r.tool_calls])
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
                ("get_weather", {"city": "Paris"}), ("add", {})]
            assert "".join(r.content for r in readings) == "" and readings[-1].finish_reason == "tool_calls"


HARMONY_MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|call|>", "<|return|>"]
LIMA = ("<|channel|>analysis<|message|>Need the <weather>.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Lima"}<|call|>')


def test_forced_harmony_call_is_a_commentary_message_read_back_as_the_call() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    tokenizer.add_special_tokens({"additional_special_tokens": HARMONY_MARKERS})
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    fmt = OutputFormat("harmony", None)
    required = ToolPlan(TOOLS, "required")
    plan = OutputPlan.of(fmt, required, tokenizer, tokenizer.encode("<|start|>assistant", add_special_tokens=False))
    assert plan.native_calls == "harmony"
    assert OutputPlan(fmt, required).native_calls is None  # a tokenizer without the markers: bare JSON

    def accepts(spec: StructuredSpec, text: str) -> bool:
        matcher: llguidance.LLMatcher = compiler.compile(spec).deep_copy()
        ok = all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
        return ok and matcher.is_accepting()

    spec = shape(call_spec(required), required, False, None, "harmony")
    call_only = LIMA[LIMA.index("<|channel|>commentary"):]
    assert accepts(spec, LIMA) and accepts(spec, call_only)
    assert not accepts(spec, LIMA.replace("city", "town"))  # arguments follow the schema
    assert not accepts(spec, "<|channel|>final<|message|>It is sunny.<|return|>")  # a call is forced
    assert not accepts(spec, LIMA.replace("Need the", "Need<|call|> the"))  # a marker ends the analysis only as <|end|>
    named = ToolPlan(TOOLS, "named", "add")
    assert not accepts(shape(call_spec(named), named, False, None, "harmony"), LIMA)
    assert accepts(shape(call_spec(named), named, False, None, "harmony"), call_only.replace(
        "get_weather", "add").replace('{"city": "Lima"}', "{}"))
    # what the grammar forces reads back as reasoning and the call, streamed or whole
    constrained = plan.constrained_by(spec)
    assert constrained.has_reasoning
    for pieces in ([LIMA], list(LIMA)):
        reader = constrained.reader()
        assert reader is not None
        readings = [reader.feed(p) for p in pieces] + [reader.finish("stop")]
        calls = merge_deltas([d for r in readings for d in r.tool_calls])
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Lima"})]
        assert "".join(r.reasoning for r in readings) == "Need the <weather>."
        assert "".join(r.content for r in readings) == "" and readings[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize("markers", [["[TOOL_CALLS]"], ["[TOOL_CALLS]", "[ARGS]"]])
def test_forced_mistral_calls_use_its_marker_tokens_and_read_back(markers: list[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    fmt = OutputFormat(None, MISTRAL, native_tools=True)
    required = ToolPlan(TOOLS, "required")
    plan = OutputPlan.of(fmt, required, tokenizer, tokenizer.encode("[INST]hi[/INST]", add_special_tokens=False))
    assert plan.native_calls == "mistral"
    spec = shape(call_spec(required), required, False, None, plan.native_calls, dict(plan.marker_tokens))

    def accepts(spec: StructuredSpec, text: str) -> bool:
        matcher: llguidance.LLMatcher = compiler.compile(spec).deep_copy()
        ok = all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
        return ok and matcher.is_accepting()

    if "[ARGS]" in markers:  # the newer form: a marker and name[ARGS]{...} per call
        text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]{}'
        assert not accepts(spec, '[TOOL_CALLS][{"name": "add", "arguments": {}}]')
    else:
        text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {}}]'
    assert accepts(spec, text)
    assert not accepts(spec, text.replace("city", "town"))  # arguments follow the schema
    assert not accepts(spec, '[{"name": "add", "arguments": {}}]')  # the marker is required
    named = ToolPlan(TOOLS, "named", "add")
    named_spec = shape(call_spec(named), named, False, None, "mistral", dict(plan.marker_tokens))
    assert not accepts(named_spec, text)
    one = "[TOOL_CALLS]add[ARGS]{}" if "[ARGS]" in markers else '[TOOL_CALLS][{"name": "add", "arguments": {}}]'
    assert accepts(named_spec, one)
    constrained = plan.constrained_by(spec)
    assert constrained.calls_in_format
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True, keep=constrained.keep_special_ids)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [detok.add([t]) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text  # the markers stay in the text the reader reads
    reader = constrained.reader()
    assert reader is not None
    readings = [reader.feed(p) for p in pieces] + [reader.finish("stop")]
    calls = merge_deltas([d for r in readings for d in r.tool_calls])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {})]
    assert "".join(r.content for r in readings) == "" and readings[-1].finish_reason == "tool_calls"
