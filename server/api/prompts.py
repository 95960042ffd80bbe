"""Prompts to token ids: chat template or plain text, and the context-length checks: by characters
before tokenizing (cheap), by tokens after.

Tokenizing is CPU work on the event loop's thread; a long prompt goes to a worker thread so that
it does not stall the token streams of other requests.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..engine.client import EngineInfo
from ..engine.request_fit import cache_message, exceeds_cache, exceeds_context, out_of_vocab
from .errors import APIError, invalid_param
from .protocol import ChatMessage

LONG_PROMPT_CHARS = 4096  # above this, tokenize in a worker thread
# A fast tokenizer holds ~150 bytes per character of its input while it works (4 concurrent 10 MB
# prompts took a server from 0.7 to 6.9 GB): at most this many long prompts are tokenized at once,
# so that peak is a small multiple of the longest prompt allowed, whatever the number of requests.
MAX_CONCURRENT_LONG_ENCODES = 2
_long_encodes = ThreadPoolExecutor(MAX_CONCURRENT_LONG_ENCODES, thread_name_prefix="sloth-tokenize")

# No token covers more characters than its own string in the vocabulary has (byte-level vocabularies
# spell one character per byte: their strings are if anything longer), so a text longer than max_model_len x
# the longest token cannot fit the context and is refused before the tokenizer sees it. The longest
# strings are runs of spaces, newlines or punctuation (the demo's: a newline + 22 spaces, 23); natural
# text averages 3-5 characters a token. The cap keeps the limit, and what tokenizing up to it costs,
# bounded for vocabularies with freak long entries: a text averaging over 32 characters a token is
# nearly all such runs, not a prompt anyone means.
MAX_CHARS_PER_TOKEN = 32
_chars_per_token: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


async def _off_loop_if_long(size: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    if size > LONG_PROMPT_CHARS:
        # The pool's future, not asyncio.to_thread's: a request cancelled while its prompt is being
        # tokenized leaves that worker busy until it finishes, and the next prompt waits for it.
        future = _long_encodes.submit(functools.partial(fn, *args, **kwargs))
        return await asyncio.wrap_future(future)
    return fn(*args, **kwargs)


def chars_per_token(tokenizer: Any) -> int:
    """The most characters one token of this tokenizer can cover (its longest vocabulary string,
    added tokens included), at most MAX_CHARS_PER_TOKEN; computed once per tokenizer."""
    known = _chars_per_token.get(tokenizer)
    if known is None:
        longest = max((len(token) for token in tokenizer.get_vocab()), default=MAX_CHARS_PER_TOKEN)
        known = _chars_per_token[tokenizer] = max(1, min(longest, MAX_CHARS_PER_TOKEN))
    return known


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
    """The longest text (in characters) whose tokens could still fit the context."""
    return max_model_len * chars_per_token(tokenizer)


def message_chars(message: ChatMessage) -> int:
    """The characters of a message's text, as the chat template will get it (its text parts)."""
    content = message.content
    thought = len(message.reasoning_content or message.reasoning or "")  # past reasoning the template renders
    if isinstance(content, str):
        return len(content) + thought
    return thought + sum(len(p["text"]) for p in content or () if isinstance(p, dict) and isinstance(p.get("text"), str))


def check_prompt_chars(num_chars: int, tokenizer: Any, max_model_len: int, what: str) -> None:
    """400 `context_length_exceeded` for a text too long to fit the context whatever its tokens:
    the tokenizer never sees it. `what` names the prompt ("prompt", "prompt[3]", "messages")."""
    if num_chars <= max_model_len:  # each token covers at least one character: it may fit
        return
    limit = max_prompt_chars(tokenizer, max_model_len)
    if num_chars > limit:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens, which holds at most {limit} "
            f"characters of text ({chars_per_token(tokenizer)} a token at most). However, you sent {num_chars} "
            f"characters in the {what}. Please reduce the length of the {what}.",
            400,
            param=what,
            code="context_length_exceeded",
        )


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _render_and_encode(tokenizer: Any, conversation: list[dict[str, str]], add_generation_prompt: bool,
                       template_kwargs: dict[str, Any] | None = None) -> list[int]:
    text = render_chat(tokenizer, conversation, add_generation_prompt, template_kwargs)
    # The template already wrote any BOS and role tokens: adding special tokens would double them.
    return _encode(tokenizer, text, add_special_tokens=False)


def render_chat(tokenizer: Any, conversation: list[dict[str, str]], add_generation_prompt: bool = True,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """`template_kwargs`: the template's extra variables (chat_template_kwargs, reasoning_effort)."""
    if not getattr(tokenizer, "chat_template", None):
        raise invalid_param("messages", "this model's tokenizer has no chat template; use /v1/completions")
    kwargs = dict(template_kwargs or {})
    # A request's add_generation_prompt: false (vLLM's extra) comes with its template variables.
    add_generation_prompt = kwargs.pop("add_generation_prompt", add_generation_prompt)
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )
    except Exception as exc:  # jinja raises on conversations a template rejects
        raise invalid_param("messages", f"the chat template rejected these messages: {exc}") from exc
    return str(text)


async def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return await _off_loop_if_long(len(text), _encode, tokenizer, text, add_special_tokens)  # type: ignore[no-any-return]


async def encode_chat(
    tokenizer: Any, conversation: list[dict[str, str]], add_generation_prompt: bool = True,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    size = sum(len(m["content"]) for m in conversation)
    return await _off_loop_if_long(size, _render_and_encode, tokenizer, conversation,  # type: ignore[no-any-return]
                                   add_generation_prompt, template_kwargs)


def check_token_ids(token_ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    if not token_ids:
        raise invalid_param(param, "the prompt is empty")
    bad = out_of_vocab(token_ids, vocab_size)
    if bad:
        raise invalid_param(param, f"token ids must be in [0, {vocab_size}); got {bad[:3]}")


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, info: EngineInfo, what: str,
                       param: str | None = None) -> int:
    """Completion budget: the request's, or all the room left; 400 if the request could never run
    (server/engine/request_fit.py). `what` names the prompt in the message ("messages" or "prompt");
    `param` the field a cache overflow names (default: `what`)."""
    max_model_len = info.max_model_len
    wanted = max_tokens if max_tokens is not None else max(max_model_len - num_prompt_tokens, 1)
    if exceeds_context(num_prompt_tokens, wanted, max_model_len):
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + wanted} tokens ({num_prompt_tokens} in the {what}, {wanted} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            400,
            param=what,
            code="context_length_exceeded",
        )
    if exceeds_cache(num_prompt_tokens, info.num_cache_tokens, wanted):
        raise APIError(cache_message(num_prompt_tokens, info.num_cache_tokens), 400, param=param or what)
    return wanted
