"""Incremental detokenization: token ids in, text deltas out, never a broken character.

A character can span several tokens (byte-level BPE splits "é" into two). Each call decodes a small
window: `decode(ids[prefix:])` minus `decode(ids[prefix:read])`; decoding a window (not one token)
keeps tokenizer-specific joining right (SentencePiece's leading spaces), and text that ends in
U+FFFD (an incomplete UTF-8 sequence) is held back until the next token completes it.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from functools import lru_cache
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# A character's UTF-8 bytes (at most 4) come in at most 4 tokens.
MAX_TOKENS_PER_CHAR = 4
_special_ids: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Every id that skip_special_tokens drops (its special tokens, added ones marked special)."""
    known = _special_ids.get(tokenizer)
    if known is None:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        ids = set(getattr(tokenizer, "all_special_ids", ()) or ()) | {i for i, t in added.items() if getattr(t, "special", False)}
        known = _special_ids[tokenizer] = frozenset(ids)
    return known


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted (as used by byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tokenizer: Any, token_id: int, byte_level: bool, text: Callable[[int], str]) -> list[int]:
    """A token's exact bytes (its text alone may be U+FFFD, part of a character): byte-level BPE's
    piece through GPT-2's table, a byte-fallback piece (<0xE6>), else its text (`text`) as UTF-8."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return [table[c] for c in piece]
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return [int(m.group(1), 16)]
    return list(text(token_id).encode("utf-8"))


_byte_kinds: weakref.WeakKeyDictionary[Any, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def byte_kind(tokenizer: Any) -> tuple[bool, bool]:
    """(byte-level BPE, tokens' bytes known exactly: byte-level or byte-fallback pieces <0xE6>),
    worked out once per tokenizer."""
    known = _byte_kinds.get(tokenizer)
    if known is None:
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        byte_level = type(decoder).__name__ == "ByteLevel"
        known = _byte_kinds[tokenizer] = (byte_level, byte_level or _has_byte_pieces(tokenizer))
    return known


def _has_byte_pieces(tokenizer: Any) -> bool:
    try:
        unk = getattr(tokenizer, "unk_token_id", None)
        found = tokenizer.convert_tokens_to_ids("<0xE6>")
    except Exception:  # a tokenizer without the call: nothing known
        return False
    return isinstance(found, int) and found != unk


def ends_mid_character(data: list[int]) -> bool:
    """Whether UTF-8 bytes end inside a character (its lead byte there, not all its bytes)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # a lead byte or ASCII: the last character starts here
            need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
            return need > back
    return False  # only continuation bytes: no character will form


def backend_decoder(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` under a transformers fast tokenizer when decoding through it gives
    the same text (no clean-up of tokenization spaces); None otherwise. Calling it directly skips
    transformers' per-call argument handling, which cost more than the decode itself per token."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True) or not hasattr(backend, "decode"):
        return None
    return backend


class IncrementalDetokenizer:
    """`keep`: special tokens shown even with skip_special_tokens (the markers of reasoning and tool
    calls a reader needs, such as gpt-oss's `<|channel|>`); the other special tokens are dropped."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.backend = backend_decoder(tokenizer)
        self.hidden: frozenset[int] = frozenset()
        if skip_special_tokens and keep:
            self.hidden = special_token_ids(tokenizer) - keep
            skip_special_tokens = False  # the ids in `hidden` are dropped before decoding instead
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # tokens before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the text that is now complete (possibly "")."""
        if self.hidden:
            new_token_ids = [t for t in new_token_ids if t not in self.hidden]
        self.token_ids.extend(new_token_ids)
        if not new_token_ids:
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if full_text.endswith(REPLACEMENT_CHAR) and self._char_incomplete():
            return ""  # wait for the rest of the character
        if len(full_text) <= len(prefix_text):
            # Nothing visible (skipped special tokens): move the window on so it stays small.
            if full_text == prefix_text:
                self.prefix_offset = self.read_offset = len(self.token_ids)
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]

    def _char_incomplete(self) -> bool:
        """Whether the U+FFFD the window's text ends with is a character still to come: the bytes of
        its last tokens end inside one. Else it is a real U+FFFD (or bytes that never form a
        character), sent rather than held back for good."""
        byte_level, exact_bytes = byte_kind(self.tokenizer)
        if not exact_bytes:  # a text ending in U+FFFD is always held back as a character still to come
            return True
        window = self.token_ids[max(self.prefix_offset, len(self.token_ids) - MAX_TOKENS_PER_CHAR) :]
        tail = [b for t in window for b in token_bytes(self.tokenizer, t, byte_level, self._token_text)]
        return ends_mid_character(tail)

    def _token_text(self, token_id: int) -> str:
        return self._decode([token_id])

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, even an incomplete character."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
