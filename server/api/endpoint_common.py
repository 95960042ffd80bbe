"""What both generation endpoints (chat and text completions) do around their own work: the start
of a request (deadline from its arrival, a loaded model, valid fields, prompts bounded in number and
characters before any tokenizing, its adapter, admission of prompts x n), a
whole, non-streamed response that stops when the client goes away, and the ending of a stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Coroutine
from contextlib import aclosing
from typing import Any, NamedTuple

from fastapi import Request, Response
from pydantic import BaseModel

from .admission import MAX_PROMPTS, Ticket
from .choice_stream import Deadline
from .disconnect import ClientDisconnected, cancel_on_disconnect
from .errors import APIError, error_json, invalid_param
from .prompts import check_prompt_chars, message_chars
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import json_response
from .runtime import Runtime
from .serving_adapters import resolve_adapter
from .sse import DONE, data_event, error_event
from .state import ServerState

logger = logging.getLogger(__name__)


class Admitted(NamedTuple):
    deadline: Deadline | None
    runtime: Runtime
    adapter_id: int
    ticket: Ticket  # the caller releases it, on every path


async def admit_generation(state: ServerState, body: ChatCompletionRequest | CompletionRequest,
                           raw: bytes | None = None) -> Admitted:
    """`raw`: the JSON body `body` was parsed from, if it was (body.check)."""
    deadline = Deadline.of(asyncio.get_running_loop().time(), body.timeout, state.config.request_timeout)
    runtime = state.ready()
    body.check(raw)
    num_prompts, param = check_prompt_sizes(runtime, body)  # before any adapter load or tokenizing
    adapter_id = await resolve_adapter(state, runtime, body.model)
    return Admitted(deadline, runtime, adapter_id, state.admission.admit(num_prompts * body.n, param))


def check_prompt_sizes(runtime: Runtime, body: ChatCompletionRequest | CompletionRequest) -> tuple[int, str]:
    """What a request costs, bounded from its raw text: 400 for more than MAX_PROMPTS prompts or a
    prompt too long (in characters) to fit the context whatever its tokens. Returns the number of
    prompts and the field that holds them."""
    tokenizer, max_model_len = runtime.tokenizer, runtime.max_model_len
    cut = body.truncate_prompt_tokens is not None  # a prompt of any length is cut to fit (--max-request-bytes bounds it)
    if isinstance(body, ChatCompletionRequest):
        if not cut:
            check_prompt_chars(sum(map(message_chars, body.messages)), tokenizer, max_model_len, "messages")
        return 1, "messages"
    prompts = body.prompts()
    if len(prompts) > MAX_PROMPTS:
        raise invalid_param("prompt", f"at most {MAX_PROMPTS} prompts are allowed in one request; got {len(prompts)}. "
                            "Send them in several requests")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and not cut:
            check_prompt_chars(len(prompt), tokenizer, max_model_len, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    return len(prompts), "prompt"


async def whole_response(request: Request, work: Coroutine[Any, Any, BaseModel], ticket: Ticket) -> Response:
    """The response `work` builds as JSON; 499 if the client left first. Releases the ticket."""
    try:
        return json_response(await cancel_on_disconnect(request, work))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        ticket.release()


async def guarded_events(events: AsyncGenerator[str, None], ticket: Ticket, name: str) -> AsyncGenerator[bytes, None]:
    """A stream's events framed for the wire; an error raised after the 200 was sent (a passed
    deadline: its own body; anything else: an internal error) becomes an error event, then DONE.
    Releases the ticket."""
    try:
        async with aclosing(events):
            async for event in events:
                yield data_event(event)
    except APIError as exc:
        yield data_event(error_json(exc))
        yield data_event(DONE)
    except Exception as exc:
        logger.exception("%s failed", name)
        yield data_event(error_event(f"internal server error: {type(exc).__name__}"))
        yield data_event(DONE)
    finally:
        ticket.release()
