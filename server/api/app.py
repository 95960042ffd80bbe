"""The FastAPI app: `create_app(config)` wires routes, errors and auth; its lifespan starts loading
the model in the background and shuts the engine down at exit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..config import Config
from ..engine.client import EngineClient
from ..version import __version__
from . import (
    health,
    metrics_route,
    serving_adapters,
    serving_chat,
    serving_completions,
    serving_models,
    serving_responses,
    serving_tokenize,
    serving_tokenizer_info,
)
from .auth import APIKeyMiddleware
from .errors import install_error_handlers
from .http_metrics import HTTPMetricsMiddleware
from .limits import BodySizeLimitMiddleware, request_bytes_limit
from .request_id import RequestIdMiddleware
from .state import ServerState


def create_app(config: Config, engine: EngineClient | None = None, front_end: int = 0) -> FastAPI:
    """`engine`: a client already started (the CLI spawns the engine process early); default: made at
    start-up. `front_end`: this process's number among the --api-server-count front ends."""
    state = ServerState(config, engine, front_end)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()  # returns at once: /health says 503 until the model is ready
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(title="sloth-serve", version=__version__, lifespan=lifespan)
    app.state.server = state
    # Routes are matched in this order, one router after another: the generation endpoints (nearly
    # every request) first. No two routes share a path, so the order changes nothing else.
    for module in (serving_chat, serving_completions, serving_responses, health, metrics_route, serving_models,
                   serving_tokenize, serving_tokenizer_info):
        app.include_router(module.router)
    if config.allow_runtime_lora:
        app.include_router(serving_adapters.router)
    install_error_handlers(app)
    # Starlette runs the last added middleware first: CORS answers preflights before auth, and the
    # size limit sits innermost, so it sees only authenticated requests.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=lambda: request_bytes_limit(state.config, state.runtime))
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, keys=config.api_key)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(HTTPMetricsMiddleware, counter=state.metrics.http_requests)  # counts all
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries x-request-id
    return app
