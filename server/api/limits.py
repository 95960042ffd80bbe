"""Limits sized from the loaded model: the request-body limit (`--max-request-bytes`, a plain ASGI
middleware: a larger body gets a 413 with an OpenAI error body, whether it announces its length or
is sent chunked, read up to the limit before the route parses anything) and the default prompt-token
budget of admission (`--max-queued-tokens`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .admission import Admission, default_token_budget
from .errors import error_body
from .prompts import max_prompt_chars

if TYPE_CHECKING:
    from ..config import Config
    from .runtime import Runtime

logger = logging.getLogger(__name__)

# --max-request-bytes' default: a prompt as long as the context allows (prompts.max_prompt_chars:
# max_model_len x up to 32 characters a token, where text averages 3-5) at UTF-8's widest, 4 bytes a
# character, plus the rest of the largest request (message structure, tools and their schemas,
# logit_bias, stop strings). Prompts of real text fit with room to spare, even JSON-escaped ("\u4e2d",
# 6 bytes for a character of ~1.5 a token). Never above the 16 MiB this server used to allow: a
# 131072-token prompt of real text is under 3 MB. Until the model is loaded (every generation route
# answers 503, to be retried) the cap applies, so that a valid request is not refused with a 413.
BYTES_PER_PROMPT_CHAR = 4
REQUEST_OVERHEAD_BYTES = 2**20
MAX_DEFAULT_REQUEST_BYTES = 16 * 2**20


def default_max_request_bytes(max_chars: int) -> int:
    return min(BYTES_PER_PROMPT_CHAR * max_chars + REQUEST_OVERHEAD_BYTES, MAX_DEFAULT_REQUEST_BYTES)


def request_bytes_limit(config: Config, runtime: Runtime | None) -> int:
    """The body limit now: --max-request-bytes, or the default derived from the loaded model (None
    until it is)."""
    if config.max_request_bytes is not None:
        return config.max_request_bytes
    if runtime is None:
        return MAX_DEFAULT_REQUEST_BYTES
    text = default_max_request_bytes(max_prompt_chars(runtime.tokenizer, runtime.max_model_len))
    if runtime.vision is None:
        return text
    limits = runtime.vision.limits  # room for the most images allowed, each as large as allowed, in base64
    return text + limits.max_images * ((limits.max_bytes + 2) // 3 * 4 + 64)


def fit_limits(config: Config, runtime: Runtime, admission: Admission) -> None:
    """Once the model is loaded: --max-queued-tokens' default from the KV cache's size, and the
    derived limits logged."""
    if config.max_queued_tokens is None:
        admission.max_tokens = default_token_budget(runtime.info.num_cache_tokens)
    logger.info("limits: prompts of at most %d characters; bodies of at most %d bytes; %s prompt tokens in flight",
                max_prompt_chars(runtime.tokenizer, runtime.max_model_len), request_bytes_limit(config, runtime),
                admission.max_tokens or "unlimited")


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int | Callable[[], int]) -> None:
        self.app = app
        self._max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes if isinstance(self._max_bytes, int) else self._max_bytes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if value.isdigit() and int(value) > max_bytes:
                    await self._reject(send, max_bytes)
                    return
                await self.app(scope, receive, send)  # the server reads no more than announced
                return
        # No announced length (chunked): read the body first, at most max_bytes of it, then replay.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > max_bytes:
                await self._reject(send, max_bytes)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send, max_bytes: int) -> None:
        message = (f"the request body is larger than the server's limit of {max_bytes} bytes (--max-request-bytes); "
                   "send shorter prompts or fewer of them")
        body = json.dumps(error_body(message, "invalid_request_error", None, "request_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
