"""The engine loop in its own thread, so the asyncio event loop never waits on the model.

Callers on the event loop `add_request` (getting an asyncio.Queue of RequestOutput) and `abort`;
commands cross to the engine thread through a thread-safe queue, outputs come back with one
`call_soon_threadsafe` per step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from server.engine.failures import describe, is_out_of_memory
from server.engine.llm_engine import LLMEngine, RequestOutput
from server.engine.mm_inputs import MultiModalInputs
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason

logger = logging.getLogger(__name__)

# The engine thread and the event loop share the GIL, which CPython hands over only once a switch
# interval (5 ms by default) has passed. An engine thread back from a GPU wait could sit that long
# while the event loop streams tokens, with the GPU idle; a shorter interval bounds that wait.
SWITCH_INTERVAL_S = 0.0005
# Hand a step's outputs over once the next step is queued on the GPU (see _run). The environment
# variable exists for A/B measurements (bench/gpu_record.sh): 0 hands them over as each step ends.
DELIVER_AT_NEXT_LAUNCH = os.environ.get("SLOTH_DELIVER_AT_NEXT_LAUNCH", "1") != "0"


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: int
    eos_token_ids: frozenset[int] | None = None
    mm: MultiModalInputs | None = None


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str
    reason: FinishReason = FinishReason.ABORT


@dataclass(frozen=True, slots=True)
class _Call:
    """Run `fn(engine)` on the engine thread between steps; its result resolves `future`."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future[Any]


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.commands: queue.Queue[_Add | _Abort | _Call | None] = queue.Queue()
        self.streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.dead_reason: str | None = None
        self._held: list[RequestOutput] = []  # engine thread: the last step's outputs, not yet handed over

    @property
    def is_running(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.dead_reason is None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.engine.defer_observation = DELIVER_AT_NEXT_LAUNCH
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.thread = threading.Thread(target=self._run, name="sloth-engine", daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        if self.thread is not None:
            self.commands.put(None)
            self.thread.join(timeout=10)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: int = 0,
        eos_token_ids: frozenset[int] | None = None, mm: MultiModalInputs | None = None,
    ) -> asyncio.Queue[RequestOutput]:
        """Call on the event loop. The queue receives the request's outputs; the last has finished=True."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if request_id in self.streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.streams[request_id] = stream
        self.commands.put(_Add(request_id, prompt_token_ids, params, adapter_id, eos_token_ids, mm))
        return stream

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Call on the event loop; safe for finished or unknown ids. `reason` is what the client
        saw (STOP when the API matched a stop string), so the metrics count it right."""
        if request_id in self.streams:
            self.commands.put(_Abort(request_id, reason))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between two steps (engine state is that thread's
        alone: adapters are added and removed this way)."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.commands.put(_Call(fn, future))
        return await future

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs; if the consumer stops early (disconnect), abort it."""
        stream = self.add_request(request_id, prompt_token_ids, params, adapter_id)
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    # --- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished_requests
            if block:
                self._release_held()  # no step will launch soon: hand the last outputs over now
            if not self._apply_commands(block):
                self._release_held()
                return
            if not engine.has_unfinished_requests:
                continue
            try:
                # A step's outputs are handed to the event loop once the *next* step is queued on
                # the GPU: the API thread then streams them while the GPU works, instead of taking
                # the GIL in the window between two steps where the GPU waits for this thread.
                outputs = engine.step(on_launched=self._release_held)
            except Exception as exc:
                self._release_held()
                if is_out_of_memory(exc):  # this step's requests fail; the engine goes on
                    logger.error("out of device memory in a step; failing its requests: %s", exc)
                    self._deliver(engine.fail_running(f"out of device memory: {exc}"[:500]))
                    release_cached_memory()
                    continue
                # Anything else is the engine's own (LLMEngine ends a request's failure with that
                # request): the model cannot be trusted to go on. Fail every request, never hang.
                logger.error("engine step failed:\n%s", traceback.format_exc())
                self.dead_reason = f"engine step failed: {type(exc).__name__}"
                self._deliver(engine.fail_all(self.dead_reason))
                self._drain_after_death()
                return
            self._held = outputs
            if not DELIVER_AT_NEXT_LAUNCH:
                self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, []
        # The held steps' metrics first (also off the GPU's critical path): a client that has its
        # response then finds it counted in /metrics. Metrics never cost a request its outputs.
        try:
            self.engine.observe_deferred()
        except Exception:
            logger.exception("recording step metrics failed")
        finally:
            self._deliver(held)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; wait for one when idle. False means shut down."""
        engine = self.engine
        try:
            cmd = self.commands.get(block=block)
        except queue.Empty:
            return True
        rejected: list[RequestOutput] = []
        while True:
            if not isinstance(cmd, _Add):
                self._release_held()  # an abort or call must see the outputs before it delivered
            if cmd is None:
                return False
            if isinstance(cmd, _Add):
                try:
                    engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.adapter_id,
                                       cmd.eos_token_ids, cmd.mm)
                except Exception as exc:  # this request's failure, whatever it is: never the engine thread's end
                    if not isinstance(exc, ValueError):
                        logger.exception("adding request %s failed", cmd.request_id)
                    error = str(exc) if isinstance(exc, ValueError) else describe(exc)
                    rejected.append(RequestOutput(cmd.request_id, [], True, FinishReason.ERROR, error=error))
            elif isinstance(cmd, _Call):
                self._run_call(cmd)
            elif not engine.abort(cmd.request_id, cmd.reason):
                # Finished already, or never reached the engine: end its stream anyway.
                rejected.append(RequestOutput(cmd.request_id, [], True, cmd.reason))
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
        self._deliver(rejected)
        return True

    def _run_call(self, cmd: _Call) -> None:
        try:
            result, error = cmd.fn(self.engine), None
        except Exception as exc:
            result, error = None, exc
        assert self.loop is not None
        self.loop.call_soon_threadsafe(_resolve, cmd.future, result, error)

    def _drain_after_death(self) -> None:
        """After a fatal error, fail whatever else arrives until shutdown."""
        while True:
            cmd = self.commands.get()
            if cmd is None:
                return
            if isinstance(cmd, _Add):
                out = RequestOutput(cmd.request_id, [], True, FinishReason.ERROR, error=self.dead_reason)
                self._deliver([out])
            elif isinstance(cmd, _Call) and self.loop is not None:
                self.loop.call_soon_threadsafe(_resolve, cmd.future, None, EngineDeadError(self.dead_reason or ""))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if outputs and self.loop is not None:
            self.loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is None:
                continue
            stream.put_nowait(out)
            if out.finished:
                del self.streams[out.request_id]


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
