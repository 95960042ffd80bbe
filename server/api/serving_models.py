"""`GET /v1/models`: the base model and the loaded adapters, each with the chat template it uses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .errors import APIError
from .responses import ModelCard, ModelList
from .state import StateDep
from .tokenizers import ModelTokenizer

router = APIRouter()


def _template_fields(tokens: ModelTokenizer) -> dict[str, Any]:
    """Which chat template and tokenizer serve the model: extra fields that OpenAI clients ignore."""
    return {"chat_template": tokens.template_source, "chat_template_hash": tokens.template_hash,
            "tokenizer": tokens.tokenizer_source}


@router.get("/v1/models")
async def list_models(state: StateDep) -> ModelList:
    runtime = state.ready()
    tokenizers = runtime.tokenizers
    cards = [ModelCard(id=runtime.base_model_id, root=state.config.model, max_model_len=runtime.max_model_len,
                       **_template_fields(tokenizers.base))]
    cards += [
        ModelCard(id=a.name, root=a.path, parent=runtime.base_model_id, max_model_len=runtime.max_model_len,
                  **_template_fields(tokenizers.of(a.adapter_id)))
        for a in runtime.adapters
    ]
    return ModelList(data=cards)


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, state: StateDep) -> ModelCard:
    for card in (await list_models(state)).data:
        if card.id == model_id:
            return card
    raise APIError(f"The model `{model_id}` does not exist.", 404, param="model", code="model_not_found")
