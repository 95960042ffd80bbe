"""Fill-in-the-middle (`suffix` on /v1/completions): the prompt a FIM-trained model expects, built
from its own FIM tokens (prefix, suffix, middle order), or a 400 when its vocabulary has none."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from .errors import invalid_param
from .prompts import LONG_PROMPT_CHARS, check_prompt_chars

# FIM token families, each (prefix, suffix, middle), written in that order around the two texts:
# Qwen2.5-Coder / Qwen3-Coder, StarCoder / StarCoder2 / SantaCoder, DeepSeek-Coder.
FIM_TOKENS: tuple[tuple[str, str, str], ...] = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)
# Per tokenizer: (its size when looked up, the FIM ids found); looked up again if tokens were added.
_found: weakref.WeakKeyDictionary[Any, tuple[int, tuple[int, int, int] | None]] = weakref.WeakKeyDictionary()


async def encode_fim(tokenizer: Any, prompt: str | list[int], suffix: str, max_model_len: int, param: str) -> list[int]:
    """The FIM prompt of a completion request with a `suffix`; long texts tokenized off the event loop."""
    require_fim_tokens(tokenizer)  # the model's lack of FIM tokens is the first thing to fix
    if not isinstance(prompt, str):
        raise invalid_param(param, "suffix (fill-in-the-middle) needs a text prompt, not token ids")
    check_prompt_chars(len(prompt) + len(suffix), tokenizer, max_model_len, "prompt and suffix")
    if len(prompt) + len(suffix) > LONG_PROMPT_CHARS:
        return await asyncio.to_thread(fim_prompt, tokenizer, prompt, suffix)
    return fim_prompt(tokenizer, prompt, suffix)


def fim_token_ids(tokenizer: Any) -> tuple[int, int, int] | None:
    """The ids of the first FIM family whose three tokens are all in the vocabulary, else None;
    looked up once per tokenizer (its vocabulary is a fresh dict on every get_vocab call)."""
    known = _found.get(tokenizer)
    if known is not None and known[0] == len(tokenizer):
        return known[1]
    vocab = tokenizer.get_vocab()
    ids = next(((vocab[p], vocab[s], vocab[m]) for p, s, m in FIM_TOKENS if p in vocab and s in vocab and m in vocab),
               None)
    _found[tokenizer] = (len(tokenizer), ids)
    return ids


def fim_prompt(tokenizer: Any, prefix: str, suffix: str) -> list[int]:
    """`<prefix token> prefix <suffix token> suffix <middle token>` as token ids (after the BOS the
    tokenizer adds, if any). The texts are encoded on their own, so FIM or other special tokens
    written in them stay plain text. A 400 naming `suffix` when the model has no FIM tokens."""
    pre, suf, mid = require_fim_tokens(tokenizer)
    return [*_leading_specials(tokenizer), pre, *_plain(tokenizer, prefix), suf, *_plain(tokenizer, suffix), mid]


def require_fim_tokens(tokenizer: Any) -> tuple[int, int, int]:
    ids = fim_token_ids(tokenizer)
    if ids is None:
        families = "; ".join(" ".join(f) for f in FIM_TOKENS)
        raise invalid_param("suffix", "suffix (fill-in-the-middle) needs a model trained for it, whose tokenizer has "
                            f"FIM tokens ({families}); this model's tokenizer has none. Remove 'suffix', or serve a "
                            "FIM-trained code model")
    return ids


def _plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with any special-token strings in it spelled as ordinary text."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _leading_specials(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before a text's own tokens (a BOS, or nothing); not what it appends."""
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a", add_special_tokens=True))
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []
