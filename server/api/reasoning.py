"""Reasoning output, `<think>...</think>` style (Qwen3, DeepSeek-R1 and their fine-tunes): splits a
choice's text, as it streams, into reasoning and content.

The reasoning is what lies between `<think>` and `</think>`. A template that opens `<think>` in the
generation prompt (DeepSeek-R1, Qwen3 "thinking" variants) makes the output start inside the reasoning
with no opening tag; `starts_in_reasoning` says so (read from the prompt's end, see `prompt_opens`).
Whitespace around the tags is dropped: the model writes `<think>\\n...\\n</think>\\n\\n` and the client
wants the two texts. Text is held back only while it might be the start of a tag (or whitespace
that might precede one), so a stream never shows a half tag.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


def partial_tail(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (what to hold back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def prompt_opens(prompt_tail: str) -> bool:
    """Whether the prompt (its rendered end) leaves a `<think>` open: the output starts in reasoning."""
    return prompt_tail.rfind(START) > prompt_tail.rfind(END)


@dataclass(slots=True)
class Split:
    """Reasoning and content text read from one piece of output."""

    reasoning: str = ""
    content: str = ""


class ThinkSplitter:
    """`feed` pieces of text, `finish` at the end; each returns the reasoning and content now certain.

    `implicit`: output that does not open with `<think>` is reasoning until `</think>` (DeepSeek-R1's
    rule, whose template opens the tag itself); otherwise such output is all content (Qwen3's rule,
    where `enable_thinking: false` leaves no reasoning)."""

    def __init__(self, starts_in_reasoning: bool = False, implicit: bool = False) -> None:
        self.buf = ""
        # "start": maybe an opening tag; "lead": whitespace after a tag; "reasoning"; "content"
        self.state = "start"
        self.after_lead = "content"
        self.default = "reasoning" if (starts_in_reasoning or implicit) else "content"

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning" or (self.state in ("start", "lead") and self._pending() == "reasoning")

    def _pending(self) -> str:
        return self.after_lead if self.state == "lead" else self.default

    def feed(self, text: str) -> Split:
        self.buf += text
        out = Split()
        while self._step(out):
            pass
        return out

    def finish(self) -> Split:
        out = self.feed("")
        rest, self.buf = self.buf, ""
        if self.state == "start" or self.state == "lead":
            self.state = self._pending()
            rest = rest.lstrip()
        if self.state == "reasoning":
            out.reasoning += rest.rstrip()
        else:
            out.content += rest
        return out

    def _step(self, out: Split) -> bool:
        """Consume what the buffer allows; False when it needs more text."""
        buf = self.buf
        if self.state == "start":
            head = buf.lstrip()
            if head.startswith(START):
                self.buf, self.state, self.after_lead = head[len(START):], "lead", "reasoning"
                return True
            if not head or START.startswith(head):
                return False  # blank so far, or a part of the opening tag
            self.state, self.after_lead = "lead", self.default
            return True
        if self.state == "lead":
            head = buf.lstrip()
            if not head:
                self.buf = ""
                return False
            self.buf, self.state = head, self.after_lead
            return True
        if self.state == "reasoning":
            at = buf.find(END)
            if at >= 0:
                out.reasoning += buf[:at].rstrip()
                self.buf, self.state, self.after_lead = buf[at + len(END):], "lead", "content"
                return True
            keep = len(buf) - partial_tail(buf, END)
            keep = len(buf[:keep].rstrip())  # trailing whitespace may precede the closing tag
            out.reasoning += buf[:keep]
            self.buf = buf[keep:]
            return False
        out.content += buf
        self.buf = ""
        return False
