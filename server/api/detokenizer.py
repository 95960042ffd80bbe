"""Incremental detokenization: token ids in, text deltas out, never a broken character.

A character can span several tokens (byte-level BPE splits "é" into two). Each call decodes a small
window: `decode(ids[prefix:])` minus `decode(ids[prefix:read])`; decoding a window (not one token)
keeps tokenizer-specific joining right (SentencePiece's leading spaces), and text that ends in
U+FFFD (an incomplete UTF-8 sequence) is held back until the next token completes it.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


def backend_decoder(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` under a transformers fast tokenizer when decoding through it gives
    the same text (no clean-up of tokenization spaces); None otherwise. Calling it directly skips
    transformers' per-call argument handling, which cost more than the decode itself per token."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True) or not hasattr(backend, "decode"):
        return None
    return backend


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.backend = backend_decoder(tokenizer)
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
