"""`GET /health` (200 when serving; 503 while loading, after a failed load or engine death, with
the engine's queue and KV-cache figures for monitoring) and `GET /version`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..version import __version__
from .state import StateDep

router = APIRouter()


@router.get("/health")
async def health(state: StateDep) -> JSONResponse:
    body = state.health()
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@router.get("/version")
async def version() -> dict[str, Any]:
    return {"version": __version__}
