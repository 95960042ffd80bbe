"""gpt-oss "harmony" output, read as it streams: the analysis channel is reasoning, the final channel
content, and a commentary message addressed `to=functions.NAME` a tool call whose body is its
arguments' JSON. Channel markers are special tokens: the detokenizer keeps them for this reader.

After the generation prompt (`<|start|>assistant`) the model writes messages such as

    <|channel|>analysis<|message|>Let me look it up.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>
    <|channel|>final<|message|>It is sunny.<|return|>

(the recipient may also come before the channel: `<|start|>assistant to=functions.x<|channel|>commentary`).
A header is read whole, then its body streams. Output that does not open with a marker (a model not
following the format) is content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .reasoning import partial_tail
from .tool_call_reader import new_call_id

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
MARKERS = (START, CHANNEL, MESSAGE, CONSTRAIN, *ENDS)
_RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")


@dataclass(slots=True)
class HarmonyReading:
    reasoning: str = ""
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # (name, arguments fragments) as deltas


class HarmonyReader:
    """`feed` pieces of output, `finish` at its end. Calls come as `delta.tool_calls` entries: the
    first with index, id and name, then fragments of the arguments."""

    def __init__(self) -> None:
        self.buf = ""
        self.state = "first"  # first | header | body | plain
        self.kind = "content"  # of the open body: reasoning | content | call
        self.num_calls = 0

    @property
    def in_reasoning(self) -> bool:
        return self.state in ("first", "header") or (self.state == "body" and self.kind == "reasoning")

    def feed(self, text: str) -> HarmonyReading:
        self.buf += text
        out = HarmonyReading()
        while self._step(out):
            pass
        return out

    def finish(self) -> HarmonyReading:
        out = self.feed("")
        rest, self.buf = self.buf, ""
        if self.state == "body":
            self._emit(out, rest)
        elif self.state in ("first", "plain"):
            out.content += rest
        return out  # a header cut short is dropped: it carried no text

    def _step(self, out: HarmonyReading) -> bool:
        buf = self.buf
        if self.state == "first":
            head = buf.lstrip()
            if head.startswith((START, CHANNEL)):
                self.state = "header"
                return True
            if not head or any(m.startswith(head) for m in (START, CHANNEL)):
                return False
            self.state = "plain"
            return True
        if self.state == "plain":
            out.content += buf
            self.buf = ""
            return False
        if self.state == "header":
            at = buf.find(MESSAGE)
            if at < 0:
                return False
            self._open(out, buf[:at])
            self.buf, self.state = buf[at + len(MESSAGE):], "body"
            return True
        # body: up to its end marker, holding back what may be the start of one
        ends = [(buf.find(m), m) for m in ENDS if m in buf]
        if ends:
            at, marker = min(ends)
            self._emit(out, buf[:at])
            self.buf, self.state = buf[at + len(marker):], "header"
            return True
        keep = len(buf) - max(partial_tail(buf, m) for m in ENDS)
        self._emit(out, buf[:keep])
        self.buf = buf[keep:]
        return False

    def _open(self, out: HarmonyReading, header: str) -> None:
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL_NAME.search(header)
        name = channel.group(1) if channel else ""
        if recipient is not None:
            self.kind = "call"
            out.calls.append({"index": self.num_calls, "id": new_call_id(), "type": "function",
                              "function": {"name": recipient.group(1), "arguments": ""}})
            self.num_calls += 1
        else:
            self.kind = "reasoning" if name == "analysis" else "content"

    def _emit(self, out: HarmonyReading, text: str) -> None:
        if not text:
            return
        if self.kind == "reasoning":
            out.reasoning += text
        elif self.kind == "content":
            out.content += text
        elif out.calls and out.calls[-1]["index"] == self.num_calls - 1:
            out.calls[-1]["function"]["arguments"] += text
        else:
            out.calls.append({"index": self.num_calls - 1, "function": {"arguments": text}})
