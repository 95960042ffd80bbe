"""From engine outputs to client-ready text: one engine request per choice, detokenized
incrementally, cut at stop strings, and the choices of one API request merged into one stream.

Closing a stream (client gone, stop string hit, deadline passed) aborts its engine requests, which
frees their KV blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from ..engine.client import (
    EngineClient,
    FinishReason,
    MultiModalInputs,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from .detokenizer import IncrementalDetokenizer
from .errors import APIError
from .stop_strings import StopStringMatcher

FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


@dataclass(frozen=True, slots=True)
class ChoiceRequest:
    index: int  # the choice's index in the response
    request_id: str  # the engine's id: `{response id}-{index}`
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: int = 0
    stop: tuple[str, ...] = ()
    include_stop: bool = False  # the text ends with the stop string or stop token that ended it
    skip_special_tokens: bool = True
    eos_token_ids: frozenset[int] | None = None  # its model's (an adapter's own); None: the engine's
    mm: MultiModalInputs | None = None  # the prompt's images (image-text models)
    keep_special_ids: frozenset[int] = frozenset()  # special tokens the output's reader needs as text
    system_prompt_end: int = 0  # where the prompt's system part ends (recurrent state snapshots); 0: unknown


@dataclass(slots=True)
class ChoiceDelta:
    """What a choice gained since its last delta. The last delta has `finish_reason` (or `error`)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # on the choice's first delta, when asked for

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must be done, on the event loop's clock, and the timeout that set it."""

    at: float
    seconds: float

    @classmethod
    def of(cls, arrival: float, timeout: float | None, server_timeout: float | None) -> Deadline | None:
        """From the request's arrival: the shorter of its `timeout` and --request-timeout (a client
        may shorten the server's limit, not extend it); None when neither is set."""
        limits = [t for t in (timeout, server_timeout) if t]
        if not limits:
            return None
        seconds = min(limits)
        return cls(arrival + seconds, seconds)

    @property
    def expired(self) -> bool:
        return asyncio.get_running_loop().time() >= self.at


class DeadlineExceeded(APIError):
    """Generation ran past the request's deadline: a 408 for a whole response (the SDK is told not
    to retry: the same request would time out again), an SSE error event for a stream."""

    def __init__(self, deadline: Deadline) -> None:
        super().__init__(
            f"the request did not finish within its deadline of {deadline.seconds:g} s "
            "(`timeout` / --request-timeout, from its arrival); generation was stopped",
            408,
            code="request_timeout",
            headers={"x-should-retry": "false"},
        )


async def _next_outputs(stream: asyncio.Queue[RequestOutput], deadline: Deadline | None) -> list[RequestOutput]:
    """Wait for one output, then take whatever else is queued: a slow consumer gets one delta for
    several engine steps instead of falling further behind. DeadlineExceeded once it has passed."""
    if deadline is None:
        first = await stream.get()
    else:
        if deadline.expired:  # checked first: a full queue would never let the timeout fire
            queued = _take_queued(stream, [])
            if queued and queued[-1].finished:
                return queued  # it finished in time; only its reader was late
            raise DeadlineExceeded(deadline)
        try:
            async with asyncio.timeout_at(deadline.at):
                first = await stream.get()
        except TimeoutError:
            raise DeadlineExceeded(deadline) from None
    return _take_queued(stream, [first])


def _take_queued(stream: asyncio.Queue[RequestOutput], outputs: list[RequestOutput]) -> list[RequestOutput]:
    """`outputs` and whatever else is queued behind them, up to the request's last output."""
    while not stream.empty() and not (outputs and outputs[-1].finished):
        outputs.append(stream.get_nowait())
    return outputs


def _feed_tokens(detok: IncrementalDetokenizer, stops: StopStringMatcher, token_ids: list[int],
                 unchecked: int) -> tuple[str, int]:
    """The text of new tokens that may be sent, and how many of the tokens it covers; the first
    `unchecked` tokens' text cannot end in a stop string (min_tokens). Several tokens at once (a slow
    reader, speculative decoding) go one at a time through the stop strings, so that the tokens after
    the one that completes a stop string are dropped with their text."""
    if len(token_ids) < 2 or not stops.stop:
        return stops.feed(detok.add(token_ids), check=unchecked < len(token_ids)), len(token_ids)
    text = ""
    for i, token in enumerate(token_ids):
        text += stops.feed(detok.add([token]), check=i >= unchecked)
        if stops.matched is not None:
            return text, i + 1
    return text, len(token_ids)


async def run_choice(
    engine: EngineClient, tokenizer: Any, req: ChoiceRequest, deadline: Deadline | None = None
) -> AsyncGenerator[ChoiceDelta, None]:
    if deadline is not None and deadline.expired:  # spent before generation began: never start it
        raise DeadlineExceeded(deadline)
    detok = IncrementalDetokenizer(tokenizer, req.skip_special_tokens, req.keep_special_ids)
    stops = StopStringMatcher(list(req.stop), req.include_stop)
    stream = engine.add_request(req.request_id, req.prompt_token_ids, req.params, req.adapter_id, req.eos_token_ids,
                                req.mm, req.system_prompt_end)
    engine_done = False
    num_tokens = 0  # output tokens so far: stop strings count once min_tokens are out
    try:
        while not engine_done:
            outputs = await _next_outputs(stream, deadline)
            last = outputs[-1]
            engine_done = last.finished
            token_ids = [t for out in outputs for t in out.new_token_ids]
            logprobs = [lp for out in outputs for lp in out.new_logprobs]
            # The EOS or stop token that ended it counts as output, but its text is not the client's
            # (as vLLM, unless include_stop_str_in_output), save a special token the reader needs.
            texted = token_ids
            if (engine_done and last.finish_reason is FinishReason.STOP and token_ids and not req.include_stop
                    and token_ids[-1] not in req.keep_special_ids):
                texted = token_ids[:-1]
            unchecked = max(req.params.min_tokens - num_tokens, 0)
            num_tokens += len(token_ids)
            text, kept = _feed_tokens(detok, stops, texted, unchecked)
            if stops.matched is not None:  # a stop string ended inside: the tokens after it are not the client's
                token_ids, logprobs = token_ids[:kept], logprobs[:kept]
            if engine_done:
                text += stops.feed(detok.flush(), check=num_tokens > req.params.min_tokens) + stops.flush()
            delta = ChoiceDelta(req.index, text, token_ids, logprobs)
            delta.prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
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
        if not engine_done:  # stop string, client gone or deadline passed: the same abort
            engine.abort(req.request_id, FinishReason.STOP if stops.matched is not None else FinishReason.ABORT)


def stream_choices(
    engine: EngineClient, tokenizer: Any, requests: list[ChoiceRequest], deadline: Deadline | None = None
) -> AsyncGenerator[ChoiceDelta, None]:
    """Deltas of all choices as they come; each choice ends with one delta where `is_last`. Past
    the deadline, DeadlineExceeded is raised and every choice's engine request is aborted. One
    choice (nearly every request) is its run_choice itself: no generator passing each delta on."""
    if len(requests) == 1:
        return run_choice(engine, tokenizer, requests[0], deadline)
    return _merged_choices(engine, tokenizer, requests, deadline)


async def _merged_choices(
    engine: EngineClient, tokenizer: Any, requests: list[ChoiceRequest], deadline: Deadline | None
) -> AsyncGenerator[ChoiceDelta, None]:
    merged: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

    async def pump(req: ChoiceRequest) -> None:
        try:
            async with aclosing(run_choice(engine, tokenizer, req, deadline)) as deltas:
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
    prompt_logprobs: list[TokenLogprob] | None = None


async def collect_choices(
    engine: EngineClient, tokenizer: Any, requests: list[ChoiceRequest], deadline: Deadline | None = None
) -> list[ChoiceResult]:
    """Run every choice to the end; an engine error becomes a 500 with the engine's message, a
    passed deadline a 408 (DeadlineExceeded): no partial result."""
    results = [ChoiceResult() for _ in requests]
    async with aclosing(stream_choices(engine, tokenizer, requests, deadline)) as deltas:
        async for delta in deltas:
            if delta.error is not None:
                raise APIError(f"generation failed: {delta.error}", 500)
            result = results[delta.index]
            result.text += delta.text
            result.num_tokens += len(delta.token_ids)
            result.logprobs += delta.logprobs
            if delta.prompt_logprobs is not None:
                result.prompt_logprobs = delta.prompt_logprobs
            result.finish_reason = delta.finish_reason or result.finish_reason
    return results
