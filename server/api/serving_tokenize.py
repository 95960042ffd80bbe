"""`POST /tokenize` (a prompt, or messages through the chat template) and `POST /detokenize`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .errors import invalid_param
from .images import chat_images, expand_images
from .prompts import (
    check_prompt_chars,
    check_token_ids,
    encode_text,
    message_chars,
)
from .protocol import DetokenizeRequest, TokenizeRequest
from .serving_adapters import resolve_adapter
from .state import StateDep
from .tool_request import encode_tool_chat, plan_tools

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: StateDep) -> dict[str, Any]:
    runtime = state.ready()
    body.check()  # text the tokenizer cannot encode: a 400, before anything quotes it
    adapter_id = await resolve_adapter(state, runtime, body.model)  # 404 for an unknown model
    if (body.prompt is None) == (body.messages is None):
        raise invalid_param("prompt", "give exactly one of 'prompt' or 'messages'")
    num_chars = len(body.prompt or "") + sum(map(message_chars, body.messages or ()))  # bounded before tokenizing
    check_prompt_chars(num_chars, runtime.tokenizer, runtime.max_model_len, "prompt" if body.messages is None else "messages")
    tokenizer = runtime.tokenizers.of(adapter_id).tokenizer  # the model's own template and added tokens
    if body.messages is not None:
        # Images are counted as the engine would see them (400 for a text-only model, as in chat).
        images = await chat_images(runtime.vision, body.model or runtime.base_model_id, body.messages)
        chat = body.chat_request()
        tokens = await encode_tool_chat(tokenizer, chat.conversation(), plan_tools(chat), chat.template_kwargs())
        if images:
            assert runtime.vision is not None
            tokens = (await expand_images(runtime.vision, tokens, images))[0]
    else:
        tokens = await encode_text(tokenizer, body.prompt or "", body.add_special_tokens)
    out: dict[str, Any] = {"tokens": tokens, "count": len(tokens), "max_model_len": runtime.max_model_len}
    if body.return_token_strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
    return out


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: StateDep) -> dict[str, Any]:
    runtime = state.ready()
    body.check()
    adapter_id = await resolve_adapter(state, runtime, body.model)
    if body.tokens:
        check_token_ids(body.tokens, runtime.vocab_size, "tokens")
    return {"prompt": runtime.tokenizers.of(adapter_id).tokenizer.decode(body.tokens)}
