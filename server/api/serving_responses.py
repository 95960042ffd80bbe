"""`POST /v1/responses` (OpenAI's Responses API), run as the equivalent chat completion: same
template, tools, grammars and engine path; whole or streamed as typed events. Responses are never
stored, so `GET` / `DELETE /v1/responses/{id}` answer 404 saying so."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace

from fastapi import APIRouter, Request, Response

from .admission import Ticket
from .choice_stream import ChoiceRequest, Deadline, collect_choices, stream_choices
from .disconnect import ClientDisconnected, cancel_on_disconnect
from .endpoint_common import admit_generation
from .engine_params import choice_requests
from .errors import APIError
from .images import chat_images, expand_images
from .output_reader import OutputPlan
from .prompts import resolve_max_tokens
from .responses_output import EventWriter, ResponseHeader, output_items, status_of, usage
from .responses_protocol import ResponsesRequest, as_responses_error
from .runtime import Runtime
from .serving_chat import output_plan, reasoning_tokens, structured_spec, system_prompt_end
from .sse import sse_response
from .state import StateDep
from .tokenizers import ModelTokenizer
from .tool_call_reader import Reading, merge_deltas
from .tool_request import encode_tool_chat, plan_tools

logger = logging.getLogger(__name__)
router = APIRouter()

NOT_STORED = ("responses are not stored by this server (every response is created with store: false), so "
              "response {id!r} cannot be {verb}; keep the output you need from the create call")


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request, state: StateDep) -> Response:
    try:
        chat = body.to_chat()
        deadline, runtime, adapter_id, ticket = await admit_generation(state, chat)
    except APIError as exc:
        raise as_responses_error(exc) from None
    try:
        tokens = runtime.tokenizers.of(adapter_id)  # the adapter's own template and EOS, where it has them
        plan = plan_tools(chat)
        images = await chat_images(runtime.vision, body.model or runtime.base_model_id, chat.messages)
        prompt_ids = await encode_tool_chat(tokens.tokenizer, chat.conversation(), plan, chat.template_kwargs())
        system_end = 0 if images else await system_prompt_end(runtime, tokens, chat, plan, prompt_ids)
        mm = None
        if images:
            assert runtime.vision is not None
            prompt_ids, mm = await expand_images(runtime.vision, prompt_ids, images)
        max_tokens = resolve_max_tokens(len(prompt_ids), chat.requested_max_tokens, runtime.info, "input")
        ticket.reserve_tokens(len(prompt_ids), "input")
        output = output_plan(runtime, tokens, plan, prompt_ids)
        structured = await structured_spec(runtime, chat, plan, "tools[{}].parameters", "text.format.schema", output)
        output = output.constrained_by(structured)
        response_id = f"resp_{uuid.uuid4().hex}"
        reqs = choice_requests(chat, response_id, [(prompt_ids, max_tokens)], None, adapter_id, runtime.vocab_size,
                               structured, tokens.eos_token_ids)
        reqs = [replace(r, keep_special_ids=output.keep_special_ids, mm=mm, system_prompt_end=system_end) for r in reqs]
    except APIError as exc:
        ticket.release()
        raise as_responses_error(exc) from None
    except BaseException:
        ticket.release()
        raise
    header = ResponseHeader(response_id, body.model or runtime.base_model_id, body)
    if body.stream:
        events = _events(runtime, tokens, output, reqs[0], header, deadline)
        return sse_response(_framed(events, ticket, response_id), ticket)
    try:
        work = _whole(runtime, tokens, output, reqs[0], header, deadline)
        return Response(json.dumps(await cancel_on_disconnect(request, work)), media_type="application/json")
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        ticket.release()


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str) -> Response:
    raise APIError(NOT_STORED.format(id=response_id, verb="retrieved"), 404, param="response_id")


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str) -> Response:
    raise APIError(NOT_STORED.format(id=response_id, verb="deleted"), 404, param="response_id")


def _read(output: OutputPlan, text: str, finish_reason: str | None) -> tuple[str, str, list[dict], str | None]:
    """Reasoning, content, whole calls and finish reason of a finished text, read as the chat endpoint reads it."""
    reader = output.reader()
    if reader is None:
        return "", text, [], finish_reason
    first, last = reader.feed(text), reader.finish(finish_reason)
    calls = merge_deltas(first.tool_calls + last.tool_calls)
    return first.reasoning + last.reasoning, first.content + last.content, calls, last.finish_reason


async def _whole(runtime: Runtime, tokens: ModelTokenizer, output: OutputPlan, req: ChoiceRequest,
                 header: ResponseHeader, deadline: Deadline | None) -> dict:
    [result] = await collect_choices(runtime.engine, tokens.tokenizer, [req], deadline)
    reasoning, content, calls, finish_reason = _read(output, result.text, result.finish_reason)
    status = status_of(finish_reason)
    items = output_items(content, calls, status, reasoning)
    spent = usage(len(req.prompt_token_ids), result.num_tokens, reasoning_tokens(tokens.tokenizer, reasoning))
    return header.response(status, items, spent, finish_reason)


async def _events(runtime: Runtime, tokens: ModelTokenizer, output: OutputPlan, req: ChoiceRequest,
                  header: ResponseHeader, deadline: Deadline | None) -> AsyncGenerator[str, None]:
    writer = EventWriter(header)
    for event in writer.start():
        yield event
    reader = output.reader()
    num_tokens = num_reasoning_tokens = 0
    async with aclosing(stream_choices(runtime.engine, tokens.tokenizer, [req], deadline)) as deltas:
        async for d in deltas:
            num_tokens += len(d.token_ids)
            if reader is not None and reader.in_reasoning:
                num_reasoning_tokens += len(d.token_ids)
            if d.error is not None:
                yield writer.fail("server_error", f"generation failed: {d.error}")
                return
            finish_reason = d.finish_reason
            reading = Reading(content=d.text) if reader is None else reader.feed(d.text)
            if reader is not None and d.is_last:
                last = reader.finish(finish_reason)
                reading.reasoning += last.reasoning
                reading.content += last.content
                reading.tool_calls += last.tool_calls
                finish_reason = last.finish_reason
            for event in writer.reasoning(reading.reasoning) + writer.text(reading.content):
                yield event
            for call in reading.tool_calls:
                for event in writer.tool_call(call):
                    yield event
            if d.is_last:
                for event in writer.finish(finish_reason, len(req.prompt_token_ids), num_tokens, num_reasoning_tokens):
                    yield event


def _frame(event: str) -> bytes:
    """`event: <type>` then `data: <json>`, as OpenAI's Responses streams are framed (no [DONE])."""
    kind = json.loads(event)["type"] if event.startswith("{") else "error"
    return f"event: {kind}\ndata: {event}\n\n".encode()


async def _framed(events: AsyncGenerator[str, None], ticket: Ticket, response_id: str) -> AsyncGenerator[bytes, None]:
    """The events on the wire; an error after the 200 (a passed deadline, a failure) becomes an
    `error` event. Releases the ticket."""
    sequence_number = 0
    try:
        async with aclosing(events):
            async for event in events:
                sequence_number += 1
                yield _frame(event)
    except APIError as exc:
        yield _frame(json.dumps({"type": "error", "sequence_number": sequence_number, "code": exc.code or exc.type,
                                 "message": exc.message, "param": exc.param}))
    except Exception as exc:
        logger.exception("response stream %s failed", response_id)
        yield _frame(json.dumps({"type": "error", "sequence_number": sequence_number, "code": "server_error",
                                 "message": f"internal server error: {type(exc).__name__}", "param": None}))
    finally:
        ticket.release()
