"""From engine outputs to client-ready text: one engine request per choice, detokenized
incrementally, cut at stop strings, and the choices of one API request merged into one stream.

Closing a stream (client gone, stop string hit) aborts its engine requests, which frees their KV
blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from server.api.detokenizer import IncrementalDetokenizer
from server.api.errors import APIError
from server.api.stop_strings import StopStringMatcher
from server.engine.async_engine import AsyncEngine
from server.engine.llm_engine import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason, TokenLogprob

FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


@dataclass(frozen=True, slots=True)
class ChoiceRequest:
    index: int  # the choice's index in the response
    request_id: str  # the engine's id: `{response id}-{index}`
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: int = 0
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True


@dataclass(slots=True)
class ChoiceDelta:
    """What a choice gained since its last delta. The last delta has `finish_reason` (or `error`)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


async def _next_outputs(stream: asyncio.Queue[RequestOutput]) -> list[RequestOutput]:
    """Wait for one output, then take whatever else is queued: a slow consumer gets one delta for
    several engine steps instead of falling further behind."""
    outputs = [await stream.get()]
    while not stream.empty() and not outputs[-1].finished:
        outputs.append(stream.get_nowait())
    return outputs


async def run_choice(engine: AsyncEngine, tokenizer: Any, req: ChoiceRequest) -> AsyncGenerator[ChoiceDelta, None]:
    detok = IncrementalDetokenizer(tokenizer, req.skip_special_tokens)
    stops = StopStringMatcher(list(req.stop))
    stream = engine.add_request(req.request_id, req.prompt_token_ids, req.params, req.adapter_id)
    engine_done = False
    try:
        while not engine_done:
            outputs = await _next_outputs(stream)
            last = outputs[-1]
            engine_done = last.finished
            token_ids = [t for out in outputs for t in out.new_token_ids]
            text = stops.feed(detok.add(token_ids))
            if engine_done:
                text += stops.feed(detok.flush()) + stops.flush()
            delta = ChoiceDelta(req.index, text, token_ids, [lp for out in outputs for lp in out.new_logprobs])
            if stops.matched is not None:
                delta.finish_reason = "stop"
            elif engine_done:
                if last.finish_reason is FinishReason.ERROR or last.finish_reason is None:
                    delta.error = last.error or "the engine failed to run this request"
                else:
                    delta.finish_reason = FINISH_REASONS[last.finish_reason]
            yield delta
            if delta.is_last:
                return  # on a stop string, `finally` aborts the engine request
    finally:
        if not engine_done:
            engine.abort(req.request_id, FinishReason.STOP if stops.matched is not None else FinishReason.ABORT)


async def stream_choices(
    engine: AsyncEngine, tokenizer: Any, requests: list[ChoiceRequest]
) -> AsyncGenerator[ChoiceDelta, None]:
    """Deltas of all choices as they come; each choice ends with one delta where `is_last`."""
    if len(requests) == 1:
        async with aclosing(run_choice(engine, tokenizer, requests[0])) as deltas:
            async for delta in deltas:
                yield delta
        return
    merged: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

    async def pump(req: ChoiceRequest) -> None:
        try:
            async with aclosing(run_choice(engine, tokenizer, req)) as deltas:
                async for delta in deltas:
                    merged.put_nowait(delta)
        except Exception as exc:
            merged.put_nowait(exc)
        finally:
            merged.put_nowait(None)

    tasks = [asyncio.create_task(pump(req)) for req in requests]
    remaining = len(tasks)
    try:
        while remaining:
            item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        # Cancelling a pump closes its run_choice, whose `finally` aborts the engine request.
        for task in tasks:
            task.cancel()


@dataclass(slots=True)
class ChoiceResult:
    """A whole choice, for non-streaming responses."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


async def collect_choices(engine: AsyncEngine, tokenizer: Any, requests: list[ChoiceRequest]) -> list[ChoiceResult]:
    """Run every choice to the end; an engine error becomes a 500 with the engine's message."""
    results = [ChoiceResult() for _ in requests]
    async with aclosing(stream_choices(engine, tokenizer, requests)) as deltas:
        async for delta in deltas:
            if delta.error is not None:
                raise APIError(f"generation failed: {delta.error}", 500)
            result = results[delta.index]
            result.text += delta.text
            result.num_tokens += len(delta.token_ids)
            result.logprobs += delta.logprobs
            result.finish_reason = delta.finish_reason or result.finish_reason
    return results
