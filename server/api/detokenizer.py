"""Incremental detokenization: token ids in, text deltas out, never a broken character.

A character can span several tokens (byte-level BPE splits "é" into two). Each call decodes a small
window: `decode(ids[prefix:])` minus `decode(ids[prefix:read])`; decoding a window (not one token)
keeps tokenizer-specific joining right (SentencePiece's leading spaces), and text that ends in
U+FFFD (an incomplete UTF-8 sequence) is held back until the next token completes it.
"""

from __future__ import annotations

import weakref
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
_special_ids: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Every id that skip_special_tokens drops (its special tokens, added ones marked special)."""
    known = _special_ids.get(tokenizer)
    if known is None:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        ids = set(getattr(tokenizer, "all_special_ids", ()) or ()) | {i for i, t in added.items() if getattr(t, "special", False)}
        known = _special_ids[tokenizer] = frozenset(ids)
    return known


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
        if full_text.endswith(REPLACEMENT_CHAR):
            return ""  # wait for the rest of the character
        if len(full_text) <= len(prefix_text):
            # Nothing visible (skipped special tokens): move the window on so it stays small.
            if full_text == prefix_text:
                self.prefix_offset = self.read_offset = len(self.token_ids)
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, even an incomplete character."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
