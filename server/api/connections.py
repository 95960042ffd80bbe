"""Connection timeouts under uvicorn: a connection that has not finished sending a request's headers
within --header-timeout is closed (uvicorn's h11 protocol waits for them forever), and one idle
after a response for --keep-alive-timeout is closed (uvicorn's own keep-alive timer)."""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# What h11 buffers of an incomplete request line + headers before answering 400 (uvicorn's default):
# with the timeout, it bounds what a slow client holds.
MAX_HEADER_BYTES = 16 * 1024


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol with a timer from a request's first byte (or the connection's opening) to its
    complete headers. h11 reports the client's side IDLE until the headers are parsed, so the timer
    runs exactly while a request's headers are awaited."""

    header_timeout: float = 10.0  # set per server by `protocol_class`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a byte is covered too

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # a new request begins (after keep-alive idling, say)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # the headers are in

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        # Still no complete headers, and no response under way (a pipelined request waits IDLE
        # behind the one being answered, whose cycle is not complete): close.
        waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.transport.close()


def protocol_class(header_timeout: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for one server's --header-timeout (uvicorn builds one per connection)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout})


def uvicorn_options(header_timeout: float, keep_alive_timeout: float) -> dict[str, Any]:
    """Keyword arguments for uvicorn.Config: the protocol above (h11 even where httptools is
    installed) and the keep-alive timeout."""
    return {
        "http": protocol_class(header_timeout),
        "timeout_keep_alive": keep_alive_timeout,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }
