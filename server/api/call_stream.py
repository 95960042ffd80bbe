"""Streams the JSON tool calls a model writes on its own (tool_choice "auto") as OpenAI does: the
call's name first, then fragments of its arguments as they are generated.

A call is streamed only once its start is certain: `{"name": "<an offered function>", "arguments": {`
(or `"parameters"`, Llama 3's key) with the name complete and the arguments opening as an object.
Anything else (keys in another order, arguments written as a string, Mistral's `name[ARGS]{...}`)
stops the streaming of that region: its remainder is read whole at the region's end, as before.
Calls may follow one another separated by blanks, `;` or `,`, or inside a JSON list.
"""

from __future__ import annotations

_KEYS = ('"arguments"', '"parameters"')
_SEPARATORS = " \t\r\n;,[]"
MORE = "more"  # the text so far may still be the start of a call header

Part = tuple[str | None, str]  # (name, arguments): a name starts a new call; None continues the last one


def _literal(buf: str, i: int, options: tuple[str, ...]) -> int | str | None:
    """The end of whichever option is at buf[i:]; MORE if buf ends inside one; None if none fits."""
    for option in options:
        if buf.startswith(option, i):
            return i + len(option)
    return MORE if any(o.startswith(buf[i:]) for o in options) else None


def call_header(buf: str, i: int, names: list[str]) -> tuple[str, int] | str | None:
    """(name, where the arguments' `{` is) of a call header at buf[i:]; MORE or None (not a header)."""
    name = ""
    for piece in ("{", '"name"', ":", "NAME", ",", "KEY", ":"):
        while i < len(buf) and buf[i].isspace():
            i += 1
        if i == len(buf):
            return MORE
        if piece == "NAME":
            if buf[i] != '"':
                return None
            end = buf.find('"', i + 1)
            if end < 0:
                return MORE if any(n.startswith(buf[i + 1:]) for n in names) else None
            name, i = buf[i + 1:end], end + 1
            if name not in names:
                return None
            continue
        found = _literal(buf, i, _KEYS if piece == "KEY" else (piece,))
        if not isinstance(found, int):
            return found
        i = found
    while i < len(buf) and buf[i].isspace():
        i += 1
    if i == len(buf):
        return MORE
    return (name, i) if buf[i] == "{" else None


class JsonEnd:
    """Finds where a JSON value that has already opened ends, fed its text in pieces: the nesting
    depth and whether the scan is inside a string (or just after a backslash in one) carry over."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, buf: str, pos: int) -> tuple[int, bool]:
        """Move through buf from pos: (where the scan stopped, True once the closing bracket is passed)."""
        while pos < len(buf):
            c = buf[pos]
            pos += 1
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
                    return pos, True
        return pos, False


class CallStream:
    """One region of calls: `feed` its text as it comes, `close` at the region's end for the text
    that was not streamed (to be read whole by the caller)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.buf = ""
        self.pos = 0
        self.mark = 0  # where the text after the last streamed call begins
        self.state = "head"  # head (between calls) | args | tail (the call's closing brace) | off
        self.json = JsonEnd()
        self.streamed = 0  # calls started in this region

    def feed(self, text: str) -> list[Part]:
        self.buf += text
        parts: list[Part] = []
        while self.state != "off" and self._step(parts):
            pass
        return parts

    def close(self) -> str:
        """The region's text not streamed: "" when every call in it was (a cut-short call stays as sent)."""
        if self.state in ("args", "tail"):
            return ""
        rest = self.buf[self.mark:]
        return rest.strip(_SEPARATORS) if self.streamed else rest  # after streamed calls: no list brackets

    def _step(self, parts: list[Part]) -> bool:
        buf = self.buf
        if self.state in ("head", "tail"):
            while self.pos < len(buf) and buf[self.pos] in (_SEPARATORS if self.state == "head" else " \t\r\n"):
                self.pos += 1
            if self.pos == len(buf):
                return False
        if self.state == "tail":
            if buf[self.pos] != "}":
                self.state = "off"
                return False
            self.pos += 1
            self.mark, self.state = self.pos, "head"
            return True
        if self.state == "head":
            head = call_header(buf, self.pos, self.names)
            if head is None:
                self.state = "off"
            if not isinstance(head, tuple):
                return False
            name, self.pos = head
            parts.append((name, ""))
            self.streamed += 1
            self.state = "args"
            return True
        start = self.pos
        self.pos, complete = self.json.scan(self.buf, self.pos)
        if self.pos > start:
            parts.append((None, buf[start:self.pos]))
        if complete:
            self.state = "tail"
        return complete

