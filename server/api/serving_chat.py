"""`POST /v1/chat/completions`: messages -> chat template -> engine, streamed over SSE or whole."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import APIRouter, Request, Response

from server.api.admission import Ticket
from server.api.disconnect import ClientDisconnected, cancel_on_disconnect
from server.api.generation import ChoiceRequest, collect_choices, stream_choices
from server.api.logprobs import chat_logprobs
from server.api.prompts import encode_chat, resolve_max_tokens
from server.api.protocol import ChatCompletionRequest
from server.api.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    Usage,
    json_response,
    now,
)
from server.api.sampling import choice_requests
from server.api.serving_adapters import resolve_adapter
from server.api.sse import DONE, error_event, sse_response
from server.api.state import Runtime, StateDep

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: StateDep
) -> Response:
    runtime = state.ready()
    body.check()
    adapter_id = await resolve_adapter(state, runtime, body.model)
    ticket = state.admission.admit()
    try:
        prompt_ids = await encode_chat(runtime.tokenizer, body.conversation())
        max_tokens = resolve_max_tokens(len(prompt_ids), body.requested_max_tokens, runtime.max_model_len, "messages")
        runtime.check_fits_cache(len(prompt_ids), "messages")
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        reqs = choice_requests(
            body, response_id, [(prompt_ids, max_tokens)], body.num_logprobs, adapter_id, runtime.vocab_size
        )
    except BaseException:
        ticket.release()
        raise
    model = body.model or runtime.base_model_id
    if body.stream:
        return sse_response(_chat_events(runtime, body, reqs, response_id, model, ticket), ticket)
    try:
        response = await cancel_on_disconnect(request, _chat_response(runtime, body, reqs, response_id, model))
        return json_response(response)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        ticket.release()


async def _chat_response(
    runtime: Runtime, body: ChatCompletionRequest, reqs: list[ChoiceRequest], response_id: str, model: str
) -> ChatCompletionResponse:
    results = await collect_choices(runtime.async_engine, runtime.tokenizer, reqs)
    choices = [
        ChatChoice(
            index=i,
            message=ChatResponseMessage(content=r.text),
            logprobs=chat_logprobs(runtime.token_texts, r.logprobs) if body.logprobs else None,
            finish_reason=r.finish_reason,
        )
        for i, r in enumerate(results)
    ]
    usage = Usage.of(len(reqs[0].prompt_token_ids), sum(r.num_tokens for r in results))
    return ChatCompletionResponse(id=response_id, model=model, choices=choices, usage=usage)


async def _chat_events(
    runtime: Runtime,
    body: ChatCompletionRequest,
    reqs: list[ChoiceRequest],
    response_id: str,
    model: str,
    ticket: Ticket,
) -> AsyncGenerator[str, None]:
    created = now()

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(
            id=response_id, created=created, model=model, choices=choices, usage=usage
        ).model_dump_json()

    num_output_tokens = 0
    try:
        for r in reqs:
            yield chunk([ChatChunkChoice(index=r.index, delta={"role": "assistant", "content": ""})])
        async with aclosing(stream_choices(runtime.async_engine, runtime.tokenizer, reqs)) as deltas:
            async for d in deltas:
                num_output_tokens += len(d.token_ids)
                if d.error is not None:
                    yield error_event(f"generation failed: {d.error}")
                    yield DONE
                    return
                if not (d.text or d.logprobs or d.is_last):
                    continue  # held back (a partial character or stop string): nothing to send yet
                choice = ChatChunkChoice(
                    index=d.index,
                    delta={"content": d.text} if d.text else {},
                    logprobs=chat_logprobs(runtime.token_texts, d.logprobs) if d.logprobs else None,
                    finish_reason=d.finish_reason,
                )
                yield chunk([choice])
        if body.include_usage:
            yield chunk([], Usage.of(len(reqs[0].prompt_token_ids), num_output_tokens))
        yield DONE
    except Exception as exc:
        logger.exception("chat stream %s failed", response_id)
        yield error_event(f"internal server error: {type(exc).__name__}")
        yield DONE
    finally:
        ticket.release()
