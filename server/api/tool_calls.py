"""Tool use in chat, response side: reads tool calls out of a choice's text as it streams, as
OpenAI's `delta.tool_calls` (index, id and name first, then fragments of the arguments' JSON).

A whole (non-streamed) response is read by the same reader fed the whole text at once, so a
streamed call reassembles into exactly the call the whole response has. The formats are those of
server/api/tools.py:
- forced calls (tool_choice "required" or a named function) follow the grammar, so they are read
  incrementally: each call is sent as soon as its name is known, its arguments as they come;
- with tool_choice "auto" the model may write anything: text that starts like a call (`{`, `[` or
  `<tool_call>`) is held back and read at the end, as calls if it parses as calls of known
  functions, else sent as content; any other text streams as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.api.tools import ToolPlan

# The start of a forced call, up to the first character of its arguments.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_CALL_STARTS = ("{", "[", "<tool_call>")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class Reading:
    """What to send for the text read so far: content and `delta.tool_calls` entries."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None  # set by finish(): "tool_calls" when calls were read whole


class ToolCallReader:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.buf = ""
        self.pos = 0
        self.state = "open" if plan.mode == "required" else "call"  # forced: a list or one object
        self.num_calls = 0
        self.args_from = 0  # where the arguments not sent yet begin
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.auto_decided: bool | None = None  # auto: None until the first non-blank character

    def feed(self, text: str) -> Reading:
        self.buf += text
        if self.plan.is_forced:
            return Reading(tool_calls=self._read_forced())
        if self.auto_decided is None:
            head = self.buf.lstrip()
            if head.startswith(_CALL_STARTS):
                self.auto_decided = True
            elif head and not "<tool_call>".startswith(head):
                self.auto_decided = False
        if self.auto_decided is False:
            content, self.buf = self.buf, ""
            return Reading(content=content)
        return Reading()  # held back: blank so far, or maybe a call

    def finish(self, finish_reason: str | None) -> Reading:
        """The rest, once the choice ended; `finish_reason` becomes "tool_calls" for whole calls."""
        if self.plan.is_forced:
            whole = self.state == "done"
            return Reading(finish_reason="tool_calls" if whole and finish_reason == "stop" else finish_reason)
        if not self.auto_decided:
            rest, self.buf = self.buf, ""
            return Reading(content=rest, finish_reason=finish_reason)
        calls = parse_calls(self.buf, self.plan.names)
        if calls is None:
            return Reading(content=self.buf, finish_reason=finish_reason)
        deltas = [{"index": i, "id": new_call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                  for i, (n, a) in enumerate(calls)]
        return Reading(tool_calls=deltas, finish_reason="tool_calls" if finish_reason == "stop" else finish_reason)

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
            complete = self._scan_arguments()
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

    def _scan_arguments(self) -> bool:
        """Move through the arguments' JSON; True once its closing bracket is passed."""
        buf = self.buf
        while self.pos < len(buf):
            c = buf[self.pos]
            self.pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return True
        return False


def parse_calls(text: str, names: list[str]) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) of each call written in `text` (a call object, a list of them, or
    `<tool_call>` blocks of either), None unless all of it is calls of functions in `names`."""
    blocks = [text]
    if "<tool_call>" in text:
        blocks = _BLOCK.findall(text)
        if not blocks or _BLOCK.sub("", text).strip():
            return None
    calls: list[tuple[str, str]] = []
    for block in blocks:
        try:
            value = json.loads(block)
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in names:
                return None
            args = item.get("arguments", item.get("parameters"))
            if not isinstance(args, dict):
                return None
            calls.append((item["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


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
