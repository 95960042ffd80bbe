"""Stop strings over streamed text: matched across token boundaries, never sent to the client.

Text that could be the start of a stop string is held back until the next delta decides it; on a
match, the text is cut just before the stop string and nothing after it is released.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str], include_stop: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop  # vLLM's include_stop_str_in_output: the text ends with it
        self.max_hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""  # held back: a suffix that may begin a stop string
        self.matched: str | None = None

    def feed(self, text: str, check: bool = True) -> str:
        """Add new text; return what is safe to send. After a match, `matched` is set. Not `check`:
        text no stop string may end in (the first min_tokens tokens'); one may still begin there."""
        if self.matched is not None:
            return ""
        if not self.stop:
            return text
        buf = self.pending + text
        if check:
            # The earliest match that ends in `text` (none ends in the held text: it is only a prefix
            # of a stop string, or was text no stop string could end in).
            held = len(self.pending)
            cut = -1
            for s in self.stop:
                i = buf.find(s, max(held - len(s) + 1, 0))
                if i != -1 and (cut == -1 or i < cut):
                    cut, self.matched = i, s
            if cut != -1:
                self.pending = ""
                assert self.matched is not None
                return buf[:cut + len(self.matched)] if self.include_stop else buf[:cut]
        hold = self._partial_suffix_len(buf)
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self.max_hold), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        """Generation ended without a match: the held-back text is ordinary text after all."""
        text, self.pending = self.pending, ""
        return "" if self.matched is not None else text
