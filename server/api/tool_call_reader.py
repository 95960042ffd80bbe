"""Tool use in chat, response side: reads tool calls out of a choice's content as it streams, as
OpenAI's `delta.tool_calls` (index, id and name first, then fragments of the arguments' JSON).

A whole (non-streamed) response is read by the same reader fed the whole text at once, so a
streamed call reassembles into exactly the call the whole response has.
- forced calls (tool_choice "required" or a named function) follow the grammar of
  server/api/tool_request.py, so they are read incrementally: each call is sent as soon as its name is
  known, its arguments as they come;
- with tool_choice "auto" the model may write text and calls in its family's format, anywhere:
  server/api/tool_formats.py reads them, streaming each call's arguments once its start is certain.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .call_stream import JsonEnd, Part
from .tool_formats import HERMES, AutoToolReader, ToolFormat
from .tool_request import ToolPlan

# The start of a forced call, up to the first character of its arguments.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class Reading:
    """What to send for the text read so far: reasoning, content and `delta.tool_calls` entries."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None  # set by finish(): "tool_calls" when calls were read whole


class ToolCallReader:
    def __init__(self, plan: ToolPlan, fmt: ToolFormat = HERMES, in_format: bool = False) -> None:
        """`in_format`: forced calls were constrained to the family's format, not bare JSON."""
        self.plan = plan
        self.auto = AutoToolReader(fmt, plan.names) if in_format or not plan.is_forced else None
        self.buf = ""
        self.pos = 0
        self.state = "open" if plan.mode == "required" else "call"  # forced: a list or one object
        self.num_calls = 0
        self.args_from = 0  # where the arguments not sent yet begin
        self.json = JsonEnd()

    def feed(self, text: str) -> Reading:
        if self.auto is None:
            self.buf += text
            return Reading(tool_calls=self._read_forced())
        content, calls = self.auto.feed(text)
        return Reading(content=content, tool_calls=self._numbered(calls))

    def finish(self, finish_reason: str | None) -> Reading:
        """The rest, once the choice ended; `finish_reason` becomes "tool_calls" for whole calls."""
        if self.auto is None:
            whole = self.state == "done"
            return Reading(finish_reason="tool_calls" if whole and finish_reason == "stop" else finish_reason)
        content, calls = self.auto.finish()
        made = self.auto.num_calls > 0 and finish_reason == "stop"
        return Reading(content=content, tool_calls=self._numbered(calls),
                       finish_reason="tool_calls" if made else finish_reason)

    def _numbered(self, parts: list[Part]) -> list[dict[str, Any]]:
        """`delta.tool_calls` entries of call parts: a named part opens a call, the others continue it."""
        out: list[dict[str, Any]] = []
        for name, arguments in parts:
            if name is not None:
                out.append({"index": self.num_calls, "id": new_call_id(), "type": "function",
                            "function": {"name": name, "arguments": arguments}})
                self.num_calls += 1
            elif out and out[-1]["index"] == self.num_calls - 1:
                out[-1]["function"]["arguments"] += arguments
            else:
                out.append({"index": self.num_calls - 1, "function": {"arguments": arguments}})
        return out

    # --- forced calls, read as they stream ----------------------------------------------------------

    def _read_forced(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list[dict[str, Any]]) -> bool:
        """Advance one state if the text allows; False when it needs more text (or is done)."""
        buf = self.buf
        if self.state in ("open", "call", "close"):
            while self.pos < len(buf) and (buf[self.pos].isspace() or (self.state == "call" and buf[self.pos] == ",")):
                self.pos += 1
            if self.pos == len(buf):
                return False
        if self.state == "open":
            self.pos += buf[self.pos] == "["
            self.state = "call"
        elif self.state == "call":
            if buf[self.pos] == "]":
                self.pos += 1
                self.state = "done"
                return False
            m = _HEADER.match(buf, self.pos)
            if m is None:
                return False
            out.append({"index": self.num_calls, "id": new_call_id(), "type": "function",
                        "function": {"name": m.group(1), "arguments": ""}})
            self.num_calls += 1
            self.pos = self.args_from = m.end()
            self.state = "args"
        elif self.state == "args":
            self.pos, complete = self.json.scan(buf, self.pos)
            if self.pos > self.args_from:
                fragment = buf[self.args_from : self.pos]
                self.args_from = self.pos
                if out and out[-1]["index"] == self.num_calls - 1:
                    out[-1]["function"]["arguments"] += fragment
                else:
                    out.append({"index": self.num_calls - 1, "function": {"arguments": fragment}})
            if not complete:
                return False
            self.state = "close"
        elif self.state == "close":
            self.pos += 1  # the call object's closing brace
            self.state = "call" if self.plan.mode == "required" else "done"
        return self.state != "done"



def merge_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole calls from their `delta.tool_calls` entries (the non-streamed message's tool_calls)."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = d.get("id", call["id"])
        fn = d.get("function", {})
        call["function"]["name"] += fn.get("name", "")
        call["function"]["arguments"] += fn.get("arguments", "")
    return [calls[i] for i in sorted(calls)]
