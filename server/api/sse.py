"""Server-sent events: `data: {json}` per chunk, `data: [DONE]` at the end, and an error event
(`data: {"error": {...}}`) if generation fails after the 200 status is already sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from server.api.admission import Ticket
from server.api.errors import error_body

DONE = "[DONE]"


def error_event(message: str, status_code: int = 500) -> str:
    return json.dumps(error_body(message, "server_error", None, status_code))


def sse_response(events: AsyncIterator[str], ticket: Ticket) -> EventSourceResponse:
    """Stream `events` (each one JSON string, or DONE). The ticket is released when the stream
    ends, however it ends: the generator's own `finally` normally does it, and the background
    task covers a response that never started its generator."""
    # ping: a comment line every 15 s keeps idle streams alive through proxies and load balancers.
    return EventSourceResponse(events, sep="\n", ping=15, background=BackgroundTask(ticket.release))
