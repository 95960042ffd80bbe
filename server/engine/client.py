"""The one interface the HTTP front end has to the engine: `EngineClient`. Requests go in as token
ids and SamplingParams, adapters as ids and folders; each request's outputs come back on its own
asyncio queue, and each step's StepStats to whoever watches (metrics, /health). Two implementations:
the engine in a thread of this process (server/engine/async_engine.py) or in its own process
(server/engine/process_client.py). The API imports this module, never the engine's internals."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

from .mm_inputs import MultiModalInputs
from .outputs import EngineInfo, RequestOutput, StepStats
from .sampling_params import SamplingParams, StructuredSpec
from .sequence import FinishReason, TokenLogprob
from .wire import AdapterNamed, AdapterUnnamed, Reply, StepOutputs

__all__ = [
    "AdapterNamed", "AdapterNews", "AdapterUnnamed", "AdapterWithdrawnError", "EngineClient", "EngineDeadError", "EngineInfo", "FinishReason", "MultiModalInputs", "RequestOutput", "SamplingParams",
    "StepOutputs", "StepStats", "StructuredSpec", "TokenLogprob",
]

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine has stopped (a fatal step error, or its process died); nothing more runs."""


class AdapterWithdrawnError(ValueError):
    """A --lora adapter was unloaded through another front end while this one was starting."""


StepListener = Callable[[StepStats, list[RequestOutput]], None]
AdapterNews = AdapterNamed | AdapterUnnamed


class EngineClient(ABC):
    """Streams per request, the latest StepStats, and death: the part both transports share. A
    subclass moves commands to the engine and hands each delivery to `_on_outputs` on the loop."""

    def __init__(self) -> None:
        self.streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self.dead_reason: str | None = None
        self.stats: StepStats | None = None  # the newest step's (None until the engine is ready)
        self.on_step: StepListener | None = None  # called on the loop with each step's record and outputs
        self.on_death: Callable[[str], None] | None = None  # called on the loop once, when the engine dies
        # With several front ends on one engine (--api-server-count), this one's number: the adapters
        # it loads while serving take ids of its own (sloth_serve.adapters.dynamic_ids_from).
        self.front_end_index: int | None = None
        # What other front ends did to shared adapters (--api-server-count): held until a listener is set.
        self.adapter_news: list[AdapterNews] = []
        self._on_adapter_news: Callable[[AdapterNews], None] | None = None

    @abstractmethod
    async def start(self) -> EngineInfo:
        """Load the model and start the engine; returns once it can take requests."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the engine (requests still running are not waited for: drain first)."""

    @abstractmethod
    def _send_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: int,
                  eos_token_ids: frozenset[int] | None, mm: MultiModalInputs | None,
                  system_prompt_end: int) -> None: ...

    @abstractmethod
    def _send_abort(self, request_id: str, reason: FinishReason) -> None: ...

    @abstractmethod
    async def add_lora(self, adapter_id: int, name: str, path: str, shared: bool = False) -> int:
        """Load the adapter folder's weights into the engine as `adapter_id`; returns its rank.
        ValueError (a message for the client) when it cannot be read or does not fit the model.
        `shared`: every front end serves it under `name` (wire.AddLora)."""

    @abstractmethod
    async def remove_lora(self, adapter_id: int) -> None:
        """Drop the adapter once no request uses it (running requests finish on its weights)."""

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: int = 0,
        eos_token_ids: frozenset[int] | None = None, mm: MultiModalInputs | None = None,
        system_prompt_end: int = 0,
    ) -> asyncio.Queue[RequestOutput]:
        """Call on the event loop. The queue receives the request's outputs; the last has finished=True.
        `eos_token_ids`: the request's own (an adapter's), None: the model's; `mm`: the prompt's images;
        `system_prompt_end`: where the prompt's system part ends (LLMEngine.add_request)."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if request_id in self.streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.streams[request_id] = stream
        self._send_add(request_id, prompt_token_ids, params, adapter_id, eos_token_ids, mm, system_prompt_end)
        return stream

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Call on the event loop; safe for finished or unknown ids. `reason` is what the client
        saw (STOP when the API matched a stop string), so the metrics count it right."""
        if request_id in self.streams and self.dead_reason is None:
            self._send_abort(request_id, reason)

    def listen_to_adapter_news(self, listener: Callable[[AdapterNews], None]) -> None:
        """Call on the loop: `listener` gets what other front ends load and unload, starting with what
        came before it was set."""
        self._on_adapter_news = listener
        held, self.adapter_news = self.adapter_news, []
        for news in held:
            listener(news)

    def _on_adapter_news_event(self, news: AdapterNews) -> None:
        if self._on_adapter_news is None:
            self.adapter_news.append(news)
        else:
            self._on_adapter_news(news)

    def _on_outputs(self, delivery: StepOutputs) -> None:
        """On the loop: each output to its request's queue, each step's record to the listener."""
        outputs = delivery.outputs
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is None:
                continue
            stream.put_nowait(out)
            if out.finished:
                del self.streams[out.request_id]
        for i, stats in enumerate(delivery.stats):
            self.stats = stats
            if self.on_step is not None:
                try:  # the outputs go with the delivery's last record (the step they came from)
                    self.on_step(stats, outputs if i == len(delivery.stats) - 1 else [])
                except Exception:  # metrics never cost a request its outputs
                    logger.exception("recording step metrics failed")

    def _die(self, reason: str, outputs: list[RequestOutput] | None = None) -> None:
        """On the loop: the engine is gone. Every open stream ends with an error output, now (the
        engine's own for those it sent, so a reader woken by one sees the engine dead)."""
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self._on_outputs(StepOutputs(outputs or []))
        streams, self.streams = self.streams, {}
        for request_id, stream in streams.items():
            stream.put_nowait(RequestOutput(request_id, [], True, FinishReason.ERROR, error=reason))
        if self.on_death is not None:
            self.on_death(reason)


def resolve_call(calls: dict[int, asyncio.Future[int | None]], reply: Reply) -> None:
    future = calls.pop(reply.call_id, None)
    if future is None or future.done():  # the caller gave up waiting
        return
    if reply.error is None:
        future.set_result(reply.result)
    elif reply.withdrawn:
        future.set_exception(AdapterWithdrawnError(reply.error))
    else:
        future.set_exception(ValueError(reply.error) if reply.is_value_error else RuntimeError(reply.error))


def fail_calls(calls: dict[int, asyncio.Future[int | None]], reason: str) -> None:
    for future in calls.values():
        if not future.done():
            future.set_exception(EngineDeadError(reason))
    calls.clear()
