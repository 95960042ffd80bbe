"""`POST /v1/completions`: text or token-id prompts (one or many) -> engine, streamed or whole."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request, Response

from ..engine.client import EngineClient, TokenLogprob
from .choice_stream import ChoiceRequest, Deadline, collect_choices, stream_choices
from .chunks import CompletionChunks
from .endpoint_common import admit_generation, guarded_events, whole_response
from .engine_params import choice_requests, compile_spec, format_spec
from .fim import encode_fim
from .logprobs import TextOffsets, completion_logprobs, echo_logprobs, prompt_logprobs
from .prompts import check_token_ids, encode_text, resolve_max_tokens
from .protocol import CompletionRequest
from .responses import CompletionChoice, CompletionLogprobs, CompletionResponse, Usage, now
from .runtime import Runtime
from .sse import DONE, error_event, sse_response
from .state import state_of
from .tokenizers import ModelTokenizer

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request
) -> Response:
    deadline, runtime, adapter_id, ticket = await admit_generation(state_of(request), body, await request.body())
    try:
        tokens = runtime.tokenizers.of(adapter_id)  # the adapter's own tokenizer and EOS, where it has them
        prompts, prompt_texts = await _encode_prompts(runtime, tokens.tokenizer, body)
        ticket.reserve_tokens(sum(len(ids) for ids, _ in prompts) * body.n, "prompt")
        wanted = format_spec(body)
        structured = None if wanted is None else await compile_spec(runtime, wanted[0], wanted[1])
        response_id = f"cmpl-{uuid.uuid4().hex}"
        reqs = choice_requests(body, response_id, prompts, body.logprobs, adapter_id, runtime.vocab_size,
                               structured, tokens.eos_token_ids, prompt_logprobs=body.engine_prompt_logprobs)
    except BaseException:
        ticket.release()
        raise
    # What each choice's text starts with: its prompt when echoing.
    echoes = [prompt_texts[r.index // body.n] if body.echo else "" for r in reqs]
    num_prompt_tokens = sum(len(ids) for ids, _ in prompts)
    model = body.model or runtime.base_model_id
    if body.stream:
        events = _completion_events(runtime.engine, tokens, body, reqs, echoes, num_prompt_tokens, response_id,
                                    model, deadline)
        return sse_response(guarded_events(events, ticket, f"completion stream {response_id}"), ticket)
    work = _completion_response(runtime.engine, tokens, body, reqs, echoes, num_prompt_tokens, response_id,
                                model, deadline)
    return await whole_response(request, work, ticket)


async def _encode_prompts(
    runtime: Runtime, tokenizer: Any, body: CompletionRequest
) -> tuple[list[tuple[list[int], int]], list[str]]:
    """(token ids, max_tokens) per prompt, and each prompt's text (for echo)."""
    prompts: list[tuple[list[int], int]] = []
    texts: list[str] = []
    all_prompts = body.prompts()
    for i, prompt in enumerate(all_prompts):
        param = "prompt" if len(all_prompts) == 1 else f"prompt[{i}]"
        if body.suffix:  # fill-in-the-middle: the model's FIM prompt around prompt and suffix
            token_ids = await encode_fim(tokenizer, prompt, body.suffix, runtime.max_model_len, param)
        else:
            token_ids = await encode_text(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        whole = len(token_ids)
        token_ids = body.truncated(token_ids, runtime.max_model_len)
        check_token_ids(token_ids, runtime.vocab_size, param)  # before echo decodes them
        if isinstance(prompt, str) and len(token_ids) == whole:
            texts.append(prompt)
        else:
            texts.append(tokenizer.decode(token_ids) if body.echo else "")
        max_tokens = resolve_max_tokens(len(token_ids), body.max_tokens, runtime.info, "prompt", param)
        prompts.append((token_ids, max_tokens))
    return prompts, texts


async def _completion_response(
    engine: EngineClient,
    tokens: ModelTokenizer,
    body: CompletionRequest,
    reqs: list[ChoiceRequest],
    echoes: list[str],
    num_prompt_tokens: int,
    response_id: str,
    model: str,
    deadline: Deadline | None,
) -> CompletionResponse:
    results = await collect_choices(engine, tokens.tokenizer, reqs, deadline)
    choices = []
    for i, r in enumerate(results):
        choice = _with_prompt(tokens, body, reqs[i], r.prompt_logprobs, CompletionChoice(index=i, text=echoes[i]))
        if body.logprobs is not None:
            generated = completion_logprobs(tokens.token_texts, r.logprobs, _text_offsets(tokens, reqs[i], echoes[i]))
            choice.logprobs = _joined(choice.logprobs, generated)
        choice.text += r.text
        choice.finish_reason = r.finish_reason
        choices.append(choice)
    usage = Usage.of(num_prompt_tokens, sum(r.num_tokens for r in results))
    return CompletionResponse(id=response_id, model=model, choices=choices, usage=usage)


async def _completion_events(
    engine: EngineClient,
    tokens: ModelTokenizer,
    body: CompletionRequest,
    reqs: list[ChoiceRequest],
    echoes: list[str],
    num_prompt_tokens: int,
    response_id: str,
    model: str,
    deadline: Deadline | None,
) -> AsyncGenerator[str, None]:
    chunks = CompletionChunks(response_id, now(), model)

    # Where each choice's generated tokens start in its text (after its echo).
    offsets = [_text_offsets(tokens, r, echoes[r.index]) for r in reqs] if body.logprobs is not None else []
    num_output_tokens = 0
    # The prompt's chunk waits for the engine when it carries the prompt's logprobs.
    scoring = body.engine_prompt_logprobs is not None and (body.logprobs is not None or body.prompt_logprobs is not None)
    if body.echo and not scoring:
        for r in reqs:
            yield chunks.choice(CompletionChoice(index=r.index, text=echoes[r.index]))
    async with aclosing(stream_choices(engine, tokens.tokenizer, reqs, deadline)) as deltas:
        async for d in deltas:
            num_output_tokens += len(d.token_ids)
            if d.error is not None:
                yield error_event(f"generation failed: {d.error}")
                yield DONE
                return
            if scoring and d.prompt_logprobs is not None:
                first = CompletionChoice(index=d.index, text=echoes[d.index] if body.echo else "")
                yield chunks.choice(_with_prompt(tokens, body, reqs[d.index], d.prompt_logprobs, first))
            if not (d.text or d.logprobs or d.is_last):
                continue
            logprobs = None
            if d.logprobs:
                logprobs = completion_logprobs(tokens.token_texts, d.logprobs, offsets[d.index])
            choice = CompletionChoice(index=d.index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)
            yield chunks.choice(choice)
    if body.include_usage:
        yield chunks.usage(Usage.of(num_prompt_tokens, num_output_tokens))
    yield DONE


def _with_prompt(tokens: ModelTokenizer, body: CompletionRequest, req: ChoiceRequest,
                 scored: list[TokenLogprob] | None, choice: CompletionChoice) -> CompletionChoice:
    """`choice` with its prompt's logprobs: echoed (echo with logprobs; `choice.text` is the echoed
    prompt, which their text_offset indexes) and vLLM's prompt_logprobs."""
    if scored is None:
        return choice
    if body.echo and body.logprobs is not None:
        choice.logprobs = echo_logprobs(tokens.token_texts, req.prompt_token_ids, scored, body.logprobs, choice.text)
    if body.prompt_logprobs is not None:
        choice.prompt_logprobs = prompt_logprobs(tokens.token_texts, scored, body.prompt_logprobs)
    return choice


def _text_offsets(tokens: ModelTokenizer, req: ChoiceRequest, echo: str) -> TextOffsets:
    """The text_offset of a choice's generated tokens: after its echo, counted in its text as
    run_choice decodes it."""
    return TextOffsets(tokens.tokenizer, len(echo), req.skip_special_tokens, req.keep_special_ids)


def _joined(head: CompletionLogprobs | None, tail: CompletionLogprobs) -> CompletionLogprobs:
    if head is None:
        return tail
    return CompletionLogprobs(tokens=head.tokens + tail.tokens, token_logprobs=head.token_logprobs + tail.token_logprobs,
                              top_logprobs=head.top_logprobs + tail.top_logprobs,
                              text_offset=head.text_offset + tail.text_offset)
