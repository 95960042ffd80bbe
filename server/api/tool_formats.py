"""Tool calls a model writes on its own (tool_choice "auto"), per model family, found anywhere in its
text: before them, between them and after them is content.

Formats (`--tool-call-parser`, else detected from the chat template by server/api/output_reader.py):
- hermes (Qwen2.5/3, Hermes, most ChatML tool templates): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  one block per call;
- llama3_json (Llama 3.1-3.3): `<|python_tag|>` then JSON calls `{"name": ..., "parameters": {...}}`
  separated by `;`, or such JSON as the whole reply;
- mistral: `[TOOL_CALLS]` then a JSON list of calls, or (newer tokenizers) `[TOOL_CALLS]name[ARGS]{...}`
  per call.
Every format also takes a reply that is only a JSON call or list of calls (what this server's own tool
prompt asks of templates without tools). A region that does not parse as calls of offered functions
is sent as the text it is. Content streams as it comes; only what may be the start of a marker (or
a reply that starts as JSON) is held back. A call is streamed (name, then fragments of its arguments)
once its start is certain (server/api/call_stream.py); one written otherwise is sent whole once complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .call_stream import CallStream, Part
from .reasoning import partial_tail


@dataclass(frozen=True, slots=True)
class ToolFormat:
    name: str
    opens: str  # the marker before the call(s)
    closes: str | None  # the marker after one call; None: the calls run to the end of the output


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>")
LLAMA3_JSON = ToolFormat("llama3_json", "<|python_tag|>", None)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", None)
TOOL_FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}

_MISTRAL_CALL = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[CALL_ID\]\s*\S+?\s*)?\[ARGS\]", re.DOTALL)
_decoder = json.JSONDecoder()

Call = tuple[str, str]  # (function name, arguments as JSON text)


def _as_call(item: Any, names: list[str]) -> Call | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return item["name"], json.dumps(args, ensure_ascii=False)


def json_calls(text: str, names: list[str]) -> list[Call] | None:
    """Calls written as JSON values (each a call or a list of calls) one after another, separated by
    blanks, `;` or `,`; None unless that is all the text is and it has at least one call."""
    calls: list[Call] = []
    pos = 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in ";,"):
            pos += 1
        if pos == len(text):
            return calls or None
        try:
            value, pos = _decoder.raw_decode(text, pos)
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _as_call(item, names)
            if call is None:
                return None
            calls.append(call)


def mistral_calls(text: str, names: list[str]) -> list[Call] | None:
    """`[TOOL_CALLS]` regions: a JSON list of calls, or `name[ARGS]{...}` (each maybe after its own marker)."""
    calls: list[Call] = []
    for part in text.split(MISTRAL.opens):
        if not part.strip():
            continue
        m = _MISTRAL_CALL.match(part)
        if m is None:
            found = json_calls(part, names)
            if found is None:
                return None
            calls += found
            continue
        try:
            args, end = _decoder.raw_decode(part, m.end())
        except ValueError:
            return None
        call = _as_call({"name": m.group(1), "arguments": args}, names)
        if call is None or part[end:].strip():
            return None
        calls.append(call)
    return calls or None


class AutoToolReader:
    """Content and calls of a model's free text, as it streams (`feed`), and at its end (`finish`).
    Calls come as parts (server/api/call_stream.py): streamed once their start is certain, else whole."""

    def __init__(self, fmt: ToolFormat, names: list[str]) -> None:
        self.fmt, self.names = fmt, names
        self.buf = ""
        self.state = "start"  # start (nothing but blanks yet) | text | region (in a call) | json (a JSON reply)
        self.stream = CallStream(names)  # the calls of the open region (or JSON reply)
        self.num_calls = 0
        self.after_call = False  # blanks right after a call are not content

    def feed(self, text: str) -> tuple[str, list[Part]]:
        self.buf += text
        content: list[str] = []
        found: list[Part] = []
        while self._step(content, found):
            pass
        return "".join(content), found

    def finish(self) -> tuple[str, list[Part]]:
        content, found = self.feed("")
        rest, self.buf = self.buf, ""
        if self.state == "text":
            content += rest.lstrip() if self.after_call else rest
        elif self.state in ("region", "json"):
            parts: list[str] = []
            self._end_region(rest, parts, found, "")
            content += "".join(parts)
        else:
            content += rest  # blanks only
        return content, found

    def _parse(self, region: str) -> list[Call] | None:
        if self.state == "region" and self.fmt is MISTRAL:
            return mistral_calls(region, self.names)
        return json_calls(region, self.names)

    def _open(self, state: str) -> None:
        self.state, self.stream = state, CallStream(self.names)

    def _end_region(self, tail: str, content: list[str], found: list[Part], closes: str) -> None:
        """The region's last text, then what of it was not streamed, read whole (or content if not calls)."""
        found += self.stream.feed(tail)
        rest = self.stream.close()
        made = self.stream.streamed
        if rest.strip():
            calls = self._parse(rest)
            if calls is None:
                opens = self.fmt.opens if not made and self.state == "region" else ""
                content.append(opens + rest + ("" if made else closes))  # not calls: text, as written
            else:
                found += calls
                made += len(calls)
        self.num_calls += made
        self.after_call = self.after_call or made > 0

    def _step(self, content: list[str], found: list[Part]) -> bool:
        buf, opens = self.buf, self.fmt.opens
        if self.state == "start":
            head = buf.lstrip()
            if head.startswith(("{", "[")) and not opens.startswith(head[:len(opens)]):
                self._open("json")
                self.buf = head
                return True
            if not head or opens.startswith(head):
                return False
            self.state = "text"
            return True
        if self.state == "text":
            if self.after_call:
                buf = self.buf = buf.lstrip()
                if not buf:
                    return False
                self.after_call = False
            at = buf.find(opens)
            if at >= 0:
                content.append(buf[:at])
                self.buf = buf[at + len(opens):]
                self._open("region")
                return True
            keep = len(buf) - partial_tail(buf, opens)
            content.append(buf[:keep])
            self.buf = buf[keep:]
            return False
        closes = self.fmt.closes if self.state == "region" else None
        if closes is None:  # a region that runs to the end, or a JSON reply: streamed as it comes
            found += self.stream.feed(buf)
            self.buf = ""
            return False
        at = buf.find(closes)
        if at < 0:
            keep = len(buf) - partial_tail(buf, closes)
            found += self.stream.feed(buf[:keep])
            self.buf = buf[keep:]
            return False
        self.buf = buf[at + len(closes):]
        self._end_region(buf[:at], content, found, closes)
        self.state = "text"
        return True
