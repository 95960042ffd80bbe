"""Whether a request can ever run: its token ids in the vocabulary, its prompt and new tokens within
the context, its prompt (plus the token it computes first) within the whole KV cache. One rule for the front end, which answers a 400
before anything is queued, and for the scheduler, which refuses what reaches it anyway (the offline
LLM). No torch, no engine state: the caller gives the limits. (The context itself is settled against
the KV cache at start-up: sloth_serve.config.fit_max_model_len.)"""

from __future__ import annotations

from collections.abc import Iterable


def out_of_vocab(token_ids: Iterable[int], vocab_size: int) -> list[int]:
    """The token ids not in [0, vocab_size), in order (the front end's 400 and the engine's refusal)."""
    return [t for t in token_ids if not 0 <= t < vocab_size]


def exceeds_context(num_prompt_tokens: int, num_new_tokens: int, max_model_len: int) -> bool:
    return num_prompt_tokens + num_new_tokens > max_model_len


def exceeds_cache(num_prompt_tokens: int, num_cache_tokens: int, num_new_tokens: int = 1) -> bool:
    """The whole cache could not hold the prompt and its first new position (it would wait forever);
    a prompt only scored (no new tokens) needs its own positions alone."""
    return num_prompt_tokens + min(num_new_tokens, 1) > num_cache_tokens


def cache_message(num_prompt_tokens: int, num_cache_tokens: int) -> str:
    return (f"the prompt has {num_prompt_tokens} tokens but the KV cache holds only {num_cache_tokens} "
            "(--num-kv-blocks x --block-size); shorten the prompt or give the server a larger cache")


def fit_error(num_prompt_tokens: int, num_new_tokens: int, max_model_len: int, num_cache_tokens: int) -> str | None:
    """Why the request cannot run, or None."""
    if exceeds_context(num_prompt_tokens, num_new_tokens, max_model_len):
        return (f"the prompt has {num_prompt_tokens} tokens and {num_new_tokens} more are asked for, but "
                f"max_model_len is {max_model_len}")
    if exceeds_cache(num_prompt_tokens, num_cache_tokens, num_new_tokens):
        return cache_message(num_prompt_tokens, num_cache_tokens)
    return None

