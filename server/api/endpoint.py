"""What both generation endpoints (chat and text completions) do around their own work: the start
of a request (deadline from its arrival, a loaded model, valid fields, its adapter, admission), a
whole, non-streamed response that stops when the client goes away, and the ending of a stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Coroutine
from contextlib import aclosing
from typing import Any, NamedTuple

from fastapi import Request, Response
from pydantic import BaseModel

from server.api.admission import Ticket
from server.api.disconnect import ClientDisconnected, cancel_on_disconnect
from server.api.errors import APIError, error_json
from server.api.generation import Deadline
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.responses import json_response
from server.api.serving_adapters import resolve_adapter
from server.api.sse import DONE, data_event, error_event
from server.api.state import Runtime, ServerState

logger = logging.getLogger(__name__)


class Admitted(NamedTuple):
    deadline: Deadline | None
    runtime: Runtime
    adapter_id: int
    ticket: Ticket  # the caller releases it, on every path


async def admit_generation(state: ServerState, body: ChatCompletionRequest | CompletionRequest) -> Admitted:
    deadline = Deadline.of(asyncio.get_running_loop().time(), body.timeout, state.config.request_timeout)
    runtime = state.ready()
    body.check()
    adapter_id = await resolve_adapter(state, runtime, body.model)
    return Admitted(deadline, runtime, adapter_id, state.admission.admit())


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
