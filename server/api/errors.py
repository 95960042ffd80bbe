"""OpenAI-style error bodies `{"error": {message, type, param, code}}` for every failure the API
returns, including FastAPI's own validation errors (400, not 422) and unknown routes (404)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error a client can act on; handlers turn it into an OpenAI error response."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type or default_type(status_code)
        self.param = param
        self.code = code
        self.headers = headers


def default_type(status_code: int) -> str:
    if status_code == 401:
        return "authentication_error"
    if status_code == 404:
        return "not_found_error"
    if status_code == 408:
        return "timeout_error"
    if status_code >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    message: str, type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    # A message may quote the request (a model name, a field path), and the request may hold lone
    # surrogates that UTF-8 cannot carry: they are written escaped, or the error itself would fail.
    return {"error": {"message": _encodable(message), "type": type, "param": _encodable(param), "code": code}}


def _encodable(text: str | None) -> str | None:
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_json(err: APIError) -> str:
    """The error's body as JSON text: an SSE error event's data once a stream's 200 is sent."""
    return json.dumps(error_body(err.message, err.type, err.param, err.code))


def error_response(err: APIError) -> JSONResponse:
    body = error_body(err.message, err.type, err.param, err.code)
    return JSONResponse(body, status_code=err.status_code, headers=err.headers)


def invalid_param(param: str, message: str) -> APIError:
    return APIError(message, 400, param=param)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def format_loc(loc: tuple[int | str, ...]) -> str | None:
    """pydantic's error location as a field path: ("body", "messages", 0, "content", "str") ->
    "messages[0].content" (union branch names like "str" or "list[int]" dropped)."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int) and parts:
            parts[-1] += f"[{p}]"
        elif p == "body" or (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p)):
            continue
        else:
            parts.append(str(p))
    return ".".join(parts) or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as `message, param`: `param` is the field path."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = format_loc(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", None
    if not param:  # the body itself: none, or not a JSON object (a form-encoded `curl -d`)
        return ("the request body must be a JSON object, sent with Content-Type: application/json "
                f"({msg})"), None
    if first.get("type") == "missing":
        return f"'{param}' is a required field", param
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(APIError(message, 400, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail) or HTTPStatus(exc.status_code).phrase
        return error_response(APIError(message, exc.status_code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        message = f"internal server error: {type(exc).__name__}"
        return error_response(APIError(message, 500))
