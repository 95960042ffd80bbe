"""Server-sent events: `data: {json}` per chunk, `data: [DONE]` at the end, and an error event
(`data: {"error": {...}}`) then `data: [DONE]` if generation fails after the 200 status is
already sent, or if the server shuts down (drain deadline passed) before the stream finished."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable

import anyio
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.types import Message, Send

from .admission import Ticket
from .errors import error_body

logger = logging.getLogger(__name__)

DONE = "[DONE]"
# How long a stream cut at shutdown gets to send its last events; less than uvicorn's graceful
# shutdown timeout (5 s, server/cli.py), after which it cancels whatever still runs.
SHUTDOWN_NOTICE_S = 2.0
SHUTDOWN_MESSAGE = (
    "the server shut down before this stream finished (its --shutdown-timeout drain deadline passed); "
    "the text so far is incomplete: retry the request"
)


def error_event(message: str, status_code: int = 500) -> str:
    return json.dumps(error_body(message, "server_error", None, status_code))


def data_event(event: str) -> bytes:
    """One `data:` event on the wire. `event` is one line (JSON text escapes its line breaks)."""
    return b"data: " + event.encode() + b"\n\n"


async def _released(ticket: Ticket) -> None:
    """The ticket's release as a coroutine: Starlette runs a plain function background task in its
    thread pool, a hop there and back for every stream."""
    ticket.release()


class _EventStream(EventSourceResponse):
    """sse-starlette's response with two changes.

    - No cancel scope around every send (it applies a per-send timeout; none is set here: a
      stalled client is bounded by the request deadline and the disconnect watch, and that scope
      was a tenth of the API thread's time per token): sends go straight to ASGI's send.
    - At server shutdown sse-starlette cancels the stream mid-way, and the client saw the body
      just stop: no error, no [DONE], nothing to tell a cut answer from a whole one. Here the
      generator is stopped (which aborts its engine requests) and the stream ends with an error
      event, then [DONE].
    - The background task (the ticket's release) is a coroutine: a plain function would be run in
      Starlette's thread pool.
    """

    def __init__(self, events: AsyncIterator[bytes], ticket: Ticket) -> None:
        self._body = anyio.CancelScope()  # around the body's sending; cancelled at shutdown
        # ping: a comment line every 15 s keeps idle streams alive through proxies and load balancers.
        super().__init__(events, sep="\n", ping=15, background=BackgroundTask(_released, ticket),
                         shutdown_grace_period=SHUTDOWN_NOTICE_S)

    def _send_with_timeout(self, send: Send, message: Message) -> Awaitable[None]:  # type: ignore[override]
        # The send itself, not a coroutine around it: one frame less for every event.
        return send(message)

    async def _stream_response(self, send: Send) -> None:
        with self._body:
            await super()._stream_response(send)
        if self._body.cancelled_caught and getattr(self, "_response_started", True):
            await self._send_shutdown_notice(send)

    async def _listen_for_exit_signal_with_grace(self) -> None:
        """sse-starlette's shutdown watch (a task it runs anyway), which here also cuts the body at
        once, instead of a task of our own per stream waiting for the same moment."""
        await self._listen_for_exit_signal()
        self._body.cancel()
        with anyio.move_on_after(SHUTDOWN_NOTICE_S):  # the notice's time; then the task group ends the rest
            while self.active:
                await anyio.sleep(0.1)

    async def _send_shutdown_notice(self, send: Send) -> None:
        """The error event and [DONE]; sse-starlette then ends the body. `active = False` tells its
        shutdown grace loop the stream is done."""
        logger.warning("stream cut at shutdown: sent the client an error event and [DONE]")
        notice = data_event(error_event(SHUTDOWN_MESSAGE, 503)) + data_event(DONE)
        with anyio.move_on_after(SHUTDOWN_NOTICE_S):
            async with self._send_lock:
                await send({"type": "http.response.body", "body": notice, "more_body": True})
        self.active = False


def sse_response(events: AsyncIterator[bytes], ticket: Ticket) -> EventSourceResponse:
    """Stream `events` (each one already framed by data_event). The ticket is released when the
    stream ends, however it ends: the generator's own `finally` normally does it, and the background
    task covers a response that never started its generator."""
    return _EventStream(events, ticket)
