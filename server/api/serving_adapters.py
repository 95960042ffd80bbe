"""Adapters by name: `model` -> engine adapter id (loading --lora-dir adapters on first use and
reloading them when their files change), and the runtime load / unload endpoints
(`--allow-runtime-lora`; behind the API key like every other route)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from ..adapters import Adapter
from .errors import APIError
from .runtime import Runtime
from .state import ServerState, StateDep

router = APIRouter()  # registered only with --allow-runtime-lora


def not_found(runtime: Runtime, model: str) -> APIError:
    names = [runtime.base_model_id, *(a.name for a in runtime.adapters)]
    return APIError(f"The model `{model}` does not exist. Available models: {', '.join(names)}", 404,
                    param="model", code="model_not_found")


async def resolve_adapter(state: ServerState, runtime: Runtime, model: str | None) -> int:
    """Engine adapter id for `model`: 0 for the base model (also when `model` is omitted)."""
    if model is None or model in (runtime.base_model_id, state.config.model):
        return 0
    registry = runtime.adapters
    adapter = registry.get(model)
    if adapter is not None and not registry.is_stale(adapter):
        return adapter.adapter_id
    folder = registry.find_in_dirs(model) if registry.lora_dirs else None
    if folder is None:
        if adapter is not None:
            return adapter.adapter_id
        raise not_found(runtime, model)
    lock = state.adapter_locks.setdefault(model, asyncio.Lock())
    async with lock:  # one load per name, however many requests ask at once
        adapter = registry.get(model)
        if adapter is None or registry.is_stale(adapter):
            adapter = await load_adapter(runtime, model, str(folder), pinned=False)
    return adapter.adapter_id


async def load_adapter(runtime: Runtime, name: str, path: str, pinned: bool) -> Adapter:
    try:
        return await runtime.load_adapter(name, path, pinned)
    except (ValueError, FileNotFoundError) as exc:  # unreadable, or does not fit this model
        raise APIError(f"adapter {name!r} could not be loaded: {exc}", 400, param="lora_path") from exc


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRARequest, state: StateDep) -> dict[str, str]:
    runtime = state.ready()
    if body.lora_name in (runtime.base_model_id, state.config.model) or runtime.adapters.get(body.lora_name):
        raise APIError(f"an adapter or model named {body.lora_name!r} is already loaded", 400, param="lora_name")
    try:
        path = runtime.adapters.allowed_path(body.lora_path)
    except PermissionError as exc:
        raise APIError(str(exc), 400, param="lora_path") from exc
    await load_adapter(runtime, body.lora_name, str(path), pinned=True)
    return {"status": "ok", "message": f"adapter {body.lora_name!r} loaded"}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRARequest, state: StateDep) -> dict[str, str]:
    runtime = state.ready()
    if body.lora_name in (runtime.base_model_id, state.config.model):
        raise APIError(f"{body.lora_name!r} is the base model, not an adapter: it cannot be unloaded", 400,
                       param="lora_name")
    if runtime.adapters.get(body.lora_name) is None:
        raise not_found(runtime, body.lora_name)
    await runtime.unload_adapter(body.lora_name)
    return {"status": "ok", "message": f"adapter {body.lora_name!r} unloaded; running requests finish on it"}
