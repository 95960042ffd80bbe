"""Every HTTP response counted by route, method and status (`sloth:http_requests_total`): the
outermost middleware, so the 401s of the key check and the 413s of the size limit count too."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"  # any path no route serves: one label, however many paths are probed


def path_routes(routes: Iterable[Any]) -> Iterator[tuple[str, re.Pattern[str]]]:
    """(template, regex) of every route, included routers' routes too (FastAPI wraps those)."""
    for route in routes:
        path, regex = getattr(route, "path", None), getattr(route, "path_regex", None)
        if isinstance(path, str) and regex is not None:
            yield path, regex
        nested = getattr(getattr(route, "original_router", route), "routes", None)
        if isinstance(nested, list):
            yield from path_routes(nested)


class HTTPMetricsMiddleware:
    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter
        self._templates: list[tuple[str, re.Pattern[str]]] | None = None

    def route_template(self, scope: Scope) -> str:
        """The path template that served this request (`/v1/models/{model_id}`, never the raw
        path, so cardinality stays bounded). Routing sets `route` when it ran; a request answered
        before routing (401, 413) is matched here against the app's routes."""
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        if self._templates is None:  # every route is in place once requests arrive
            self._templates = list(path_routes(getattr(scope.get("app"), "routes", [])))
        raw = scope["path"]
        return next((template for template, regex in self._templates if regex.match(raw)), UNMATCHED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            if status is None:  # what Starlette's error middleware will answer
                status = 500
            raise
        finally:
            if status is not None:  # None: the client left before any response began
                self.counter.labels(self.route_template(scope), scope["method"], str(status)).inc()
