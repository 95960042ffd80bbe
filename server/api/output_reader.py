"""What a choice's text means: reasoning, content and tool calls, read as it streams. The reasoning
and tool-call formats are the model's (detected from its chat template, or named by
--reasoning-parser / --tool-call-parser); one reader per choice composes them: reasoning is split
off first, then the content is searched for calls."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from ..engine.sampling_params import StructuredSpec
from .detokenizer import special_token_ids
from .harmony import MARKERS as HARMONY_MARKERS
from .harmony import HarmonyReader
from .reasoning import END, START, ThinkSplitter, prompt_opens
from .tool_call_reader import Reading, ToolCallReader
from .tool_formats import HERMES, LLAMA3_JSON, MISTRAL, TOOL_FORMATS, ToolFormat
from .tool_request import ToolPlan

PROMPT_TAIL_TOKENS = 16  # of the prompt, decoded to see whether its template opened the reasoning



@dataclass(frozen=True, slots=True)
class OutputFormat:
    """How one model writes reasoning and tool calls."""

    reasoning: str | None  # "qwen3", "deepseek_r1", "harmony" or None (no reasoning section)
    tools: ToolFormat | None  # None: harmony (its reader finds the calls)
    native_tools: bool = False  # the template (or the flag) teaches the tool format: forced calls use it

    @property
    def is_harmony(self) -> bool:
        return self.reasoning == "harmony" or self.tools is None

    @property
    def markers(self) -> tuple[str, ...]:
        """The texts this format reads: special tokens spelling them are kept by the detokenizer."""
        if self.is_harmony:
            return HARMONY_MARKERS
        think = (START, END) if self.reasoning is not None else ()
        tools = self.tools or HERMES
        closes = (tools.closes,) if tools.closes else ()
        extra = ("[ARGS]", "[CALL_ID]") if tools is MISTRAL else ()
        return (*think, tools.opens, *closes, *extra)


@lru_cache(maxsize=64)
def output_format(template: str | None, reasoning_parser: str = "auto", tool_call_parser: str = "auto") -> OutputFormat:
    """The format of a model with this chat template, the flags overriding what the template says."""
    text = template or ""
    harmony = "<|channel|>" in text
    reasoning: str | None = {"none": None, "gpt_oss": "harmony"}.get(reasoning_parser, reasoning_parser)
    if reasoning_parser == "auto":
        reasoning = "harmony" if harmony else "qwen3" if START in text else None
    tools: ToolFormat | None
    if tool_call_parser in ("harmony", "openai"):
        tools = None
    elif tool_call_parser != "auto":
        tools = TOOL_FORMATS[tool_call_parser]
    elif harmony:
        tools = None
    elif "[TOOL_CALLS]" in text:
        tools = MISTRAL
    elif "<|python_tag|>" in text or ("<|start_header_id|>" in text and "<tool_call>" not in text):
        tools = LLAMA3_JSON
    else:
        tools = HERMES  # also reads a reply of bare JSON calls, what the generic tool prompt asks for
    native = tool_call_parser != "auto" or (tools is not None and tools.opens in text)
    return OutputFormat(reasoning, tools, native)


class OutputReader:
    """Reasoning, content and calls of one choice: `feed` its text as it comes, `finish` at the end.
    `prompt_tail`: the end of the rendered prompt (a template may open the reasoning there);
    `constrained`: a grammar shapes the output from its first token, so it has no reasoning."""

    def __init__(self, fmt: OutputFormat, plan: ToolPlan | None, prompt_tail: str = "", constrained: bool = False,
                 calls_in_format: bool = False) -> None:
        self.harmony = HarmonyReader() if fmt.is_harmony and not constrained else None
        self.think: ThinkSplitter | None = None
        if fmt.reasoning in ("qwen3", "deepseek_r1") and not constrained:
            self.think = ThinkSplitter(prompt_opens(prompt_tail), implicit=fmt.reasoning == "deepseek_r1")
        self.tools = ToolCallReader(plan, fmt.tools or HERMES, calls_in_format) if plan is not None else None
        self.num_calls = 0

    @property
    def in_reasoning(self) -> bool:
        part = self.harmony or self.think
        return part is not None and part.in_reasoning

    def feed(self, text: str) -> Reading:
        return self._read(text, None, last=False)

    def finish(self, finish_reason: str | None) -> Reading:
        return self._read("", finish_reason, last=True)

    def _read(self, text: str, finish_reason: str | None, last: bool) -> Reading:
        out = Reading(finish_reason=finish_reason)
        calls: list[dict[str, Any]] = []
        if self.harmony is not None:
            h = self.harmony.finish() if last else self.harmony.feed(text)
            out.reasoning, text = h.reasoning, h.content
            calls = h.calls
        elif self.think is not None:
            s = self.think.finish() if last else self.think.feed(text)
            out.reasoning, text = s.reasoning, s.content
        if self.tools is None:
            out.content = text
        else:
            reading = self.tools.feed(text)
            if last:
                end = self.tools.finish(finish_reason)
                reading.content += end.content
                reading.tool_calls += end.tool_calls
            out.content = reading.content
            calls += reading.tool_calls
        out.tool_calls = self._renumber(calls)
        if last and self.num_calls and finish_reason == "stop":
            out.finish_reason = "tool_calls"
        return out

    def _renumber(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One index sequence over the calls of both readers (harmony's and the content's)."""
        out = []
        for c in calls:
            if "id" in c:
                self.num_calls += 1
            out.append({**c, "index": self.num_calls - 1})
        return out


_marker_ids: weakref.WeakKeyDictionary[Any, dict[OutputFormat, dict[str, int]]] = weakref.WeakKeyDictionary()


def marker_ids(tokenizer: Any, fmt: OutputFormat) -> dict[str, int]:
    """The format's markers that `tokenizer` spells as one special token, with its id; looked up
    once per tokenizer and format (every chat request asks). A copy: callers may change it."""
    known = _marker_ids.setdefault(tokenizer, {})
    ids = known.get(fmt)
    if ids is None:
        specials = special_token_ids(tokenizer)
        ids = {}
        for marker in fmt.markers:
            token_id = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token_id, int) and token_id in specials and tokenizer.convert_ids_to_tokens(token_id) == marker:
                ids[marker] = token_id
        known[fmt] = ids
    return dict(ids)


def marker_token_ids(tokenizer: Any, fmt: OutputFormat) -> frozenset[int]:
    """The special tokens of `tokenizer` that spell the format's markers (kept in the text)."""
    return frozenset(marker_ids(tokenizer, fmt).values())


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """How the choices of one request are read: its model's format, its tools, the end of its prompt."""

    fmt: OutputFormat
    tools: ToolPlan | None
    prompt_tail: str = ""
    keep_special_ids: frozenset[int] = frozenset()
    constrained: bool = False  # a JSON grammar shapes the output from its first token: no reasoning
    calls_in_format: bool = False  # forced calls are constrained to the family's format (tool_grammar.py)
    marker_tokens: tuple[tuple[str, int], ...] = ()  # (marker, its special token id): grammars name them by id

    @classmethod
    def of(cls, fmt: OutputFormat, tools: ToolPlan | None, tokenizer: Any, prompt_ids: list[int]) -> OutputPlan:
        tail = str(tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False))
        markers = marker_ids(tokenizer, fmt)
        return cls(fmt, tools, tail, frozenset(markers.values()), marker_tokens=tuple(markers.items()))

    @property
    def think(self) -> str | None:
        """How a grammar must leave room for `<think>` reasoning: "open" (the prompt opened it),
        "optional", or None (no such reasoning, or the prompt closed it: thinking switched off)."""
        if self.fmt.reasoning not in ("qwen3", "deepseek_r1"):
            return None
        if prompt_opens(self.prompt_tail):
            return "open"
        return None if END in self.prompt_tail else "optional"

    @property
    def hermes_calls(self) -> bool:
        """Forced calls are written as the model's `<tool_call>` blocks (its template teaches them)."""
        return self.fmt.tools is HERMES and self.fmt.native_tools

    @property
    def native_calls(self) -> str | None:
        """The format forced calls are written in when the template teaches it (hermes, llama3_json,
        mistral or harmony; None: the generic prompt's bare JSON)."""
        if self.fmt.is_harmony:  # only where the tokenizer has every marker as a special token
            return "harmony" if len(self.keep_special_ids) == len(HARMONY_MARKERS) else None
        if self.fmt.tools is MISTRAL and self.fmt.native_tools:  # its marker must be a special token
            return MISTRAL.name if MISTRAL.opens in dict(self.marker_tokens) else None
        if self.fmt.tools in (HERMES, LLAMA3_JSON) and self.fmt.native_tools:
            return self.fmt.tools.name
        return None

    def constrained_by(self, spec: StructuredSpec | None) -> OutputPlan:
        """This plan once the output's grammar is known: a JSON-schema grammar leaves no reasoning; a
        shaped one (Lark, from tool_grammar.shape) writes forced calls in the family's format."""
        if spec is None:
            return self
        forced = self.tools is not None and self.tools.is_forced
        return replace(self, constrained=spec.kind == "json",
                       calls_in_format=forced and spec.kind == "lark" and self.native_calls is not None)

    @property
    def has_reasoning(self) -> bool:
        return (self.fmt.reasoning is not None or self.fmt.is_harmony) and not self.constrained

    def reader(self) -> OutputReader | None:
        """A choice's reader; None when its text is all content."""
        if self.tools is None and not self.has_reasoning:
            return None
        return OutputReader(self.fmt, self.tools, self.prompt_tail, self.constrained, self.calls_in_format)
