"""Server-sent events: `data: {json}` per chunk, `data: [DONE]` at the end, and an error event
(`data: {"error": {...}}`) if generation fails after the 200 status is already sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.types import Message, Send

from server.api.admission import Ticket
from server.api.errors import error_body

DONE = "[DONE]"


def error_event(message: str, status_code: int = 500) -> str:
    return json.dumps(error_body(message, "server_error", None, status_code))


def data_event(event: str) -> bytes:
    """One `data:` event on the wire. `event` is one line (JSON text escapes its line breaks)."""
    return b"data: " + event.encode() + b"\n\n"


class _EventStream(EventSourceResponse):
    """sse-starlette's response, minus the cancel scope it opens around every send to apply a
    per-send timeout: no timeout is set here (a stalled client is bounded by the request deadline
    and the disconnect watch), and that scope was a tenth of the API thread's time per token."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
        else:
            await send(message)


def sse_response(events: AsyncIterator[bytes], ticket: Ticket) -> EventSourceResponse:
    """Stream `events` (each one already framed by data_event). The ticket is released when the
    stream ends, however it ends: the generator's own `finally` normally does it, and the background
    task covers a response that never started its generator."""
    # ping: a comment line every 15 s keeps idle streams alive through proxies and load balancers.
    return _EventStream(events, sep="\n", ping=15, background=BackgroundTask(ticket.release))
