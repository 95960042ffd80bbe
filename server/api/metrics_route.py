"""`GET /metrics`: the Prometheus text format of the server's registry (open without an API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .state import StateDep

router = APIRouter()


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    runtime = state.runtime
    state.metrics.adapters.set(0 if runtime is None else len(runtime.adapters.by_name))
    state.metrics.set_server(state.status, state.admission.num_in_flight, state.admission.limit)
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
