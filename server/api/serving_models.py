"""`GET /v1/models`, and the mapping of a request's `model` to the base model or an adapter."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.errors import APIError
from server.api.responses import ModelCard, ModelList
from server.api.state import StateDep

router = APIRouter()


@router.get("/v1/models")
async def list_models(state: StateDep) -> ModelList:
    runtime = state.ready()
    cards = [ModelCard(id=runtime.base_model_id, root=state.config.model, max_model_len=runtime.max_model_len)]
    cards += [
        ModelCard(id=a.name, root=a.path, parent=runtime.base_model_id, max_model_len=runtime.max_model_len)
        for a in runtime.adapters
    ]
    return ModelList(data=cards)


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, state: StateDep) -> ModelCard:
    for card in (await list_models(state)).data:
        if card.id == model_id:
            return card
    raise APIError(f"The model `{model_id}` does not exist.", 404, param="model", code="model_not_found")
