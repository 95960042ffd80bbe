"""`GET /metrics`: the Prometheus text format of the server's registry (open without an API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .state import StateDep

router = APIRouter()


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    state.publish_metrics()
    return Response(generate_latest(state.scrape_registry()), media_type=CONTENT_TYPE_LATEST)
