"""Engine TokenLogprobs in OpenAI's two formats: chat (`content[] {token, logprob, bytes,
top_logprobs}`) and legacy completions (`tokens, token_logprobs, top_logprobs, text_offset`), the
latter for an echoed prompt too; and prompt logprobs in vLLM's `prompt_logprobs` shape."""

from __future__ import annotations

from typing import Any

from ..engine.client import TokenLogprob
from .detokenizer import IncrementalDetokenizer, byte_kind, token_bytes
from .responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)


class TokenTexts:
    """Cached text and raw bytes of single tokens. A token's text alone may be U+FFFD (part of a
    character); its bytes are exact."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_level = byte_kind(tokenizer)[0]
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id])
        return text

    def bytes(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._bytes[token_id] = self._raw_bytes(token_id)
        return raw

    def _raw_bytes(self, token_id: int) -> list[int]:
        return token_bytes(self.tokenizer, token_id, self.byte_level, self.text)


def chat_logprobs(texts: TokenTexts, items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=texts.text(lp.token_id),
                logprob=lp.logprob,
                bytes=texts.bytes(lp.token_id),
                top_logprobs=[
                    TopLogprob(token=texts.text(t), logprob=v, bytes=texts.bytes(t)) for t, v in lp.top
                ],
            )
            for lp in items
        ]
    )


class TextOffsets:
    """OpenAI's `text_offset` of a choice's generated tokens: where each token's text starts in the
    choice's text. The tokens go through a detokenizer like the one that made the text (token by
    token, so several tokens of one engine step each get their own offset), and each starts after
    the characters the tokens before it completed: the tokens of one character split over several
    (byte-level BPE's "😀") all start where that character does, and an offset never goes back."""

    def __init__(self, tokenizer: Any, start: int = 0, skip_special_tokens: bool = True,
                 keep: frozenset[int] = frozenset()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens, keep)
        self.end = start  # where the next token's text starts

    def add(self, token_id: int) -> int:
        """The token's offset; the next one starts after the text it completed."""
        start = self.end
        self.text_of(token_id)
        return start

    def text_of(self, token_id: int) -> str:
        """The text the token completes (possibly ""), which the next token starts after."""
        text = self._detok.add([token_id])
        self.end += len(text)
        return text

    def rest(self) -> str:
        """The text still held back at the end (an incomplete character)."""
        return self._detok.flush()


def completion_logprobs(texts: TokenTexts, items: list[TokenLogprob], offsets: TextOffsets) -> CompletionLogprobs:
    """`offsets`: the choice's, past the tokens before these. Each top-k dict also holds the sampled
    token itself (up to k + 1 entries), as OpenAI's and vLLM's do."""
    out = CompletionLogprobs()
    for lp in items:
        token = texts.text(lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        top = {texts.text(t): v for t, v in lp.top}
        top.setdefault(token, lp.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offsets.add(lp.token_id))
    return out


def echo_logprobs(texts: TokenTexts, prompt_ids: list[int], scored: list[TokenLogprob], k: int,
                  echoed: str) -> CompletionLogprobs:
    """An echoed prompt's entries, as OpenAI's legacy API gave them: the first token has no
    logprob (None), each later one its logprob and a top-k dict that also holds the token itself.
    `echoed`: the prompt's text at the start of the choice's text, which `text_offset` indexes."""
    out = CompletionLogprobs(text_offset=prompt_text_offsets(texts.tokenizer, prompt_ids, echoed))
    for j, token_id in enumerate(prompt_ids):
        token = texts.text(token_id)
        out.tokens.append(token)
        if j == 0:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        lp = scored[j - 1]
        out.token_logprobs.append(lp.logprob)
        top = {texts.text(t): v for t, v in lp.top[:k]}
        top.setdefault(token, lp.logprob)
        out.top_logprobs.append(top)
    return out


def prompt_text_offsets(tokenizer: Any, prompt_ids: list[int], echoed: str) -> list[int]:
    """Where each prompt token's text starts in `echoed`, counted as TextOffsets counts generated
    tokens. The echoed text is the prompt as sent: a text prompt's own string (without the special
    tokens its encoding added, such as a BOS) or a token-id prompt's decoding (with them); the
    decoding that gives back `echoed` is used. Where none does (a tokenizer that does not round-trip
    the text), the offsets are approximate, still non-decreasing and within `echoed`."""
    for skip_special_tokens in (False, True):
        offsets = TextOffsets(tokenizer, 0, skip_special_tokens)
        starts: list[int] = []
        for token_id in prompt_ids:
            starts.append(offsets.end)
            if not echoed.startswith(offsets.text_of(token_id), starts[-1]):
                break  # not this decoding: stop at the first token that differs
        else:
            if echoed[offsets.end:] == offsets.rest():
                return starts
    offsets = TextOffsets(tokenizer, 0, skip_special_tokens=True)
    return [min(offsets.add(token_id), len(echoed)) for token_id in prompt_ids]


def prompt_logprobs(texts: TokenTexts, scored: list[TokenLogprob], k: int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: None for the first token, then per position the prompt token and
    the top-k alternatives, keyed by token id, each with its logprob, rank and text."""
    out: PromptLogprobs = [None]
    for lp in scored:
        entry = {str(lp.token_id): PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=texts.text(lp.token_id))}
        for rank, (t, v) in enumerate(lp.top[:k], start=1):
            entry.setdefault(str(t), PromptLogprob(logprob=v, rank=rank, decoded_token=texts.text(t)))
        out.append(entry)
    return out
