"""Prompts to token ids: chat template or plain text, and the context-length check.

Tokenizing is CPU work on the event loop's thread; a long prompt goes to a worker thread so that
it does not stall the token streams of other requests.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.api.errors import APIError, invalid_param

LONG_PROMPT_CHARS = 4096  # above this, tokenize in a worker thread


async def _off_loop_if_long(size: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    if size > LONG_PROMPT_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _render_and_encode(tokenizer: Any, conversation: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = render_chat(tokenizer, conversation, add_generation_prompt)
    # The template already wrote any BOS and role tokens: adding special tokens would double them.
    return _encode(tokenizer, text, add_special_tokens=False)


def render_chat(tokenizer: Any, conversation: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise invalid_param("messages", "this model's tokenizer has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as exc:  # jinja raises on conversations a template rejects
        raise invalid_param("messages", f"the chat template rejected these messages: {exc}") from exc
    return str(text)


async def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return await _off_loop_if_long(len(text), _encode, tokenizer, text, add_special_tokens)  # type: ignore[no-any-return]


async def encode_chat(
    tokenizer: Any, conversation: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    size = sum(len(m["content"]) for m in conversation)
    return await _off_loop_if_long(size, _render_and_encode, tokenizer, conversation, add_generation_prompt)  # type: ignore[no-any-return]


def check_token_ids(token_ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    if not token_ids:
        raise invalid_param(param, "the prompt is empty")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise invalid_param(param, f"token ids must be in [0, {vocab_size}); got {bad[:3]}")


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, what: str) -> int:
    """Completion budget: the request's, or all the room left; 400 if it does not fit.
    `what` names the prompt in the message ("messages" or "prompt")."""
    wanted = max_tokens if max_tokens is not None else max(max_model_len - num_prompt_tokens, 1)
    if num_prompt_tokens + wanted > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + wanted} tokens ({num_prompt_tokens} in the {what}, {wanted} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            400,
            param=what,
            code="context_length_exceeded",
        )
    return wanted
