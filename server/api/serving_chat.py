"""`POST /v1/chat/completions`: messages -> chat template -> engine, streamed over SSE or whole."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request, Response

from ..engine.client import EngineClient, StructuredSpec
from .choice_stream import ChoiceRequest, Deadline, collect_choices, stream_choices
from .chunks import ChatChunks
from .endpoint_common import admit_generation, guarded_events, whole_response
from .engine_params import choice_requests, compile_spec, format_spec
from .errors import APIError, invalid_param
from .images import chat_images, expand_images
from .logprobs import chat_logprobs, prompt_logprobs
from .output_reader import OutputPlan, OutputReader, output_format
from .prompts import resolve_max_tokens
from .protocol import ChatCompletionRequest
from .responses import (
    ChatChoice,
    ChatCompletionResponse,
    ChatResponseMessage,
    ResponseToolCall,
    Usage,
    now,
)
from .runtime import Runtime
from .sse import DONE, error_event, sse_response
from .state import state_of
from .tokenizers import ModelTokenizer
from .tool_call_reader import merge_deltas
from .tool_grammar import shape
from .tool_request import ToolPlan, call_spec, encode_tool_chat, plan_tools

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request
) -> Response:
    deadline, runtime, adapter_id, ticket = await admit_generation(state_of(request), body, await request.body())
    try:
        tokens = runtime.tokenizers.of(adapter_id)  # the adapter's own template and EOS, where it has them
        plan = plan_tools(body)
        images = await chat_images(runtime.vision, body.model or runtime.base_model_id, body.messages)
        prompt_ids = await encode_tool_chat(tokens.tokenizer, body.conversation(), plan, body.template_kwargs())
        if body.truncate_prompt_tokens is not None:
            if images:
                raise invalid_param("truncate_prompt_tokens", "truncate_prompt_tokens cannot cut a prompt with images")
            prompt_ids = body.truncated(prompt_ids, runtime.max_model_len)
        system_end = 0 if images else await system_prompt_end(runtime, tokens, body, plan, prompt_ids)
        mm = None
        if images:
            assert runtime.vision is not None
            prompt_ids, mm = await expand_images(runtime.vision, prompt_ids, images)
        max_tokens = resolve_max_tokens(len(prompt_ids), body.requested_max_tokens, runtime.info, "messages")
        ticket.reserve_tokens(len(prompt_ids) * body.n, "messages")
        output = output_plan(runtime, tokens, plan, prompt_ids)
        structured = await structured_spec(runtime, body, plan, output=output)
        output = output.constrained_by(structured)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        reqs = choice_requests(
            body, response_id, [(prompt_ids, max_tokens)], body.num_logprobs, adapter_id, runtime.vocab_size,
            structured, tokens.eos_token_ids, prompt_logprobs=body.prompt_logprobs,
        )
        if mm is not None:
            reqs = [replace(r, mm=mm) for r in reqs]
        reqs = [replace(r, keep_special_ids=output.keep_special_ids, system_prompt_end=system_end) for r in reqs]
    except BaseException:
        ticket.release()
        raise
    model = body.model or runtime.base_model_id
    if body.stream:
        events = _chat_events(runtime.engine, tokens, body, output, reqs, response_id, model, deadline)
        return sse_response(guarded_events(events, ticket, f"chat stream {response_id}"), ticket)
    work = _chat_response(runtime.engine, tokens, body, output, reqs, response_id, model, deadline)
    return await whole_response(request, work, ticket)


async def system_prompt_end(runtime: Runtime, tokens: ModelTokenizer, body: ChatCompletionRequest,
                            plan: ToolPlan | None, prompt_ids: list[int]) -> int:
    """Where the prompt's leading system messages end, for an engine that snapshots its model's
    recurrent state there (0: it does not, there are none, or nothing follows them): the prompt's
    common prefix with those messages rendered alone (tools and template variables as in the prompt),
    or, for a template that wants a user turn, with an empty user message after them."""
    if not runtime.info.state_snapshots:
        return 0
    conversation = body.conversation()
    n = 0
    while n < len(conversation) and conversation[n]["role"] in ("system", "developer"):
        n += 1
    if n == 0 or n == len(conversation):
        return 0
    for head in (conversation[:n], [*conversation[:n], {"role": "user", "content": ""}]):
        try:
            ids = await encode_tool_chat(tokens.tokenizer, head, plan, body.template_kwargs())
        except APIError:  # the template will not render this conversation: try the next, else no point
            continue
        same = 0
        for a, b in zip(ids, prompt_ids, strict=False):
            if a != b:
                break
            same += 1
        return same
    return 0


async def structured_spec(runtime: Runtime, body: ChatCompletionRequest, plan: ToolPlan | None,
                          tool_param: str = "tools[{}].function.parameters",
                          format_param: str = "response_format.json_schema.schema",
                          output: OutputPlan | None = None) -> StructuredSpec | None:
    """The grammar of the output, compiled: a forced tool call's, else the response format's, in the
    model's own format (`output`: after its reasoning, forced calls as its family writes them). Every
    tool's parameters are compiled too (cached), so that a bad one is a 400 whatever tool_choice.
    `tool_param` / `format_param` name those fields in errors (the Responses API names them its way)."""
    for i, tool in enumerate(body.tools or ()):
        if tool.function.parameters is not None:
            one = ToolPlan([tool.model_dump(exclude_none=True)], "named", tool.function.name)
            spec = call_spec(one)
            assert spec is not None
            await compile_spec(runtime, spec, tool_param.format(i))
    spec = call_spec(plan) if plan is not None else None
    if spec is not None:
        if output is not None:
            spec = shape(spec, plan, output.hermes_calls, output.think, output.native_calls, dict(output.marker_tokens))
        return await compile_spec(runtime, spec, "tools")
    wanted = format_spec(body, format_param)
    if wanted is None:
        return None
    spec, param, is_format = wanted
    if is_format and output is not None:
        spec = shape(spec, None, False, output.think)
    return await compile_spec(runtime, spec, param)


def output_plan(runtime: Runtime, tokens: ModelTokenizer, plan: ToolPlan | None, prompt_ids: list[int]) -> OutputPlan:
    """How this request's output is read: its model's reasoning and tool-call formats."""
    fmt = output_format(tokens.tokenizer.chat_template, runtime.reasoning_parser, runtime.tool_call_parser)
    return OutputPlan.of(fmt, plan, tokens.tokenizer, prompt_ids)


def _message(text: str, finish_reason: str | None, output: OutputPlan,
             show_reasoning: bool = True) -> tuple[ChatResponseMessage, str | None, str]:
    """The assistant message of a whole choice, read by the same reader as a stream, its finish
    reason and its reasoning (left out of the message when `show_reasoning` is false)."""
    reader = output.reader()
    if reader is None:
        return ChatResponseMessage(content=text), finish_reason, ""
    first, last = reader.feed(text), reader.finish(finish_reason)
    calls = merge_deltas(first.tool_calls + last.tool_calls)
    content = first.content + last.content
    thought = first.reasoning + last.reasoning
    shown = thought if output.has_reasoning and show_reasoning else None
    tool_calls = [ResponseToolCall.model_validate(c) for c in calls] or None
    message = ChatResponseMessage(content=content or (None if calls else ""), tool_calls=tool_calls,
                                  reasoning_content=shown, reasoning=shown)
    return message, last.finish_reason, thought


async def _chat_response(
    engine: EngineClient, tokens: ModelTokenizer, body: ChatCompletionRequest, output: OutputPlan,
    reqs: list[ChoiceRequest], response_id: str, model: str, deadline: Deadline | None,
) -> ChatCompletionResponse:
    results = await collect_choices(engine, tokens.tokenizer, reqs, deadline)
    choices = []
    thinking = 0
    for i, r in enumerate(results):
        message, finish_reason, thought = _message(r.text, r.finish_reason, output, body.include_reasoning)
        thinking += reasoning_tokens(tokens.tokenizer, thought)
        logprobs = chat_logprobs(tokens.token_texts, r.logprobs) if body.logprobs else None
        choices.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=finish_reason))
    usage = Usage.of(len(reqs[0].prompt_token_ids), sum(r.num_tokens for r in results),
                     thinking if output.has_reasoning else None)
    scored = results[0].prompt_logprobs  # every choice has the same prompt
    prompt = None
    if body.prompt_logprobs is not None and scored is not None:
        prompt = prompt_logprobs(tokens.token_texts, scored, body.prompt_logprobs)
    return ChatCompletionResponse(id=response_id, model=model, choices=choices, usage=usage, prompt_logprobs=prompt)


async def _chat_events(
    engine: EngineClient,
    tokens: ModelTokenizer,
    body: ChatCompletionRequest,
    output: OutputPlan,
    reqs: list[ChoiceRequest],
    response_id: str,
    model: str,
    deadline: Deadline | None,
) -> AsyncGenerator[str, None]:
    chunks = ChatChunks(response_id, now(), model)

    num_output_tokens = num_reasoning_tokens = 0
    readers = {r.index: output.reader() for r in reqs}
    for r in reqs:
        yield chunks.choice(r.index, {"role": "assistant", "content": ""})
    async with aclosing(stream_choices(engine, tokens.tokenizer, reqs, deadline)) as deltas:
        async for d in deltas:
            num_output_tokens += len(d.token_ids)
            reader = readers[d.index]
            if reader is not None and reader.in_reasoning:  # these tokens were written inside the reasoning
                num_reasoning_tokens += len(d.token_ids)
            if d.error is not None:
                yield error_event(f"generation failed: {d.error}")
                yield DONE
                return
            if d.prompt_logprobs is not None and body.prompt_logprobs is not None:
                yield chunks.prompt(d.index, prompt_logprobs(tokens.token_texts, d.prompt_logprobs, body.prompt_logprobs))
            delta, finish_reason = _delta(reader, d.text, d.finish_reason if d.is_last else None)
            if not body.include_reasoning:
                for key in ("reasoning_content", "reasoning"):
                    delta.pop(key, None)
            if not (delta or d.logprobs or d.is_last):
                continue  # held back (a partial character, stop string or call): nothing to send yet
            logprobs = chat_logprobs(tokens.token_texts, d.logprobs) if d.logprobs else None
            yield chunks.choice(d.index, delta, finish_reason, logprobs)
    if body.include_usage:
        thinking = num_reasoning_tokens if output.has_reasoning else None
        yield chunks.usage(Usage.of(len(reqs[0].prompt_token_ids), num_output_tokens, thinking))
    yield DONE


def _delta(reader: OutputReader | None, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """A streamed chunk's delta: reasoning, content, tool calls, or several; the reader's finish reason last."""
    if reader is None:
        return ({"content": text} if text else {}), finish_reason
    reading = reader.feed(text)
    if finish_reason is not None:
        last = reader.finish(finish_reason)
        reading.reasoning += last.reasoning
        reading.content += last.content
        reading.tool_calls += last.tool_calls
        finish_reason = last.finish_reason
    delta: dict[str, Any] = {}
    if reading.reasoning:
        delta["reasoning_content"] = delta["reasoning"] = reading.reasoning
    if reading.content:
        delta["content"] = reading.content
    if reading.tool_calls:
        delta["tool_calls"] = reading.tool_calls
    return delta, finish_reason


def reasoning_tokens(tokenizer: Any, reasoning: str | None) -> int:
    """Tokens of a whole choice's reasoning (re-encoded: the reader splits text, not tokens)."""
    return len(tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
