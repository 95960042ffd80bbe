"""Bearer API keys (`--api-key`): every route but health, metrics and version needs one.

A plain ASGI middleware (not BaseHTTPMiddleware) so streaming responses pass through untouched;
keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_body

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    given_bytes = given.encode()
    # Compare against every key (no early exit) so timing does not tell which one came close.
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_bytes, key.encode())
    return found


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and key_matches(token, self.keys):
            await self.app(scope, receive, send)
            return
        if token is None:
            message = "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        else:
            message = "Incorrect API key provided."
        body = json.dumps(error_body(message, "authentication_error", None, "invalid_api_key")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
