"""The engine's own thread: apply commands between steps, step while there is work, and send each
step's outputs and StepStats out through `send`, whatever carries them (a thread hand-over or a
socket: the loop knows neither). The engine's state belongs to this thread alone."""

from __future__ import annotations

import logging
import queue
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import startup_clock
from ..loader.peft import LoRAWeights
from . import stalls
from .failures import describe, is_out_of_memory
from .llm_engine import LLMEngine, StepObserver
from .loras import load_adapter
from .outputs import EngineInfo, RequestOutput, StepStats
from .scheduler import ScheduledBatch, Scheduler
from .sequence import FinishReason
from .wire import (
    Abort,
    AddLora,
    AddRequest,
    Command,
    Dead,
    Event,
    RemoveLora,
    Reply,
    Shutdown,
    StepOutputs,
)

logger = logging.getLogger(__name__)
_ON_CUDA = torch.cuda.is_available()


@dataclass(frozen=True, slots=True)
class LoadedLora:
    """An AddLora whose files were read off this thread: only the engine's part is left."""

    call_id: int
    adapter_id: int
    weights: LoRAWeights


def engine_info(engine: LLMEngine) -> EngineInfo:
    loaded = engine.loaded
    return EngineInfo(
        folder=str(loaded.folder), adapter_folder=None if loaded.adapter_folder is None else str(loaded.adapter_folder),
        eos_token_ids=frozenset(engine.eos_token_ids), vocab_size=int(loaded.model.config.vocab_size),
        max_model_len=engine.max_model_len, num_blocks=engine.block_manager.num_blocks,
        block_size=engine.block_manager.block_size, max_lora_rank=engine.lora_manager.max_rank,
        startup_phases=engine.startup_phases,
        state_snapshots=engine.block_manager.snapshots is not None,
    )


def step_stats(scheduler: Scheduler, batch: ScheduledBatch | None, forward_seconds: float | None,
               now: float) -> StepStats:
    bm = scheduler.block_manager
    ran = batch is not None and not batch.is_empty
    return StepStats(
        time=now, num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
        num_free_blocks=bm.num_free_blocks, num_blocks=bm.num_blocks,
        num_step_tokens=batch.num_tokens if ran and batch is not None else 0,
        num_preempted=batch.num_preempted if batch is not None else 0, forward_seconds=forward_seconds,
        num_prefix_queries=bm.num_prefix_queries, num_prefix_hits=bm.num_prefix_hits,
        running_adapters=frozenset(s.adapter_id for s in scheduler.running),
        waiting_adapters=frozenset(s.adapter_id for s in scheduler.waiting), max_loras=scheduler.config.max_loras,
        kernel_compiles=stalls.compiles_while_serving, slow_gc_pauses=stalls.slow_collections,
        gpu_memory_allocated=torch.cuda.memory_allocated() if _ON_CUDA else 0,
        gpu_memory_reserved=torch.cuda.memory_reserved() if _ON_CUDA else 0,
        num_state_slots_used=bm.state_slots.num_used if bm.state_slots is not None else 0,
        spec=scheduler.spec_stats if scheduler.spec_stats.enabled else None,
    )


class _StatsRecorder:
    """The engine's observer: each step's StepStats, kept until the loop sends them. An observer
    set on the engine before (a test's) is still called."""

    def __init__(self, inner: StepObserver | None) -> None:
        self.inner = inner
        self.records: list[StepStats] = []

    def on_step(self, scheduler: Scheduler, batch: ScheduledBatch | None, outputs: list[RequestOutput],
                forward_seconds: float | None, now: float) -> None:
        self.records.append(step_stats(scheduler, batch, forward_seconds, now))
        if self.inner is not None:
            self.inner.on_step(scheduler, batch, outputs, forward_seconds, now)


class EngineLoop:
    def __init__(self, engine: LLMEngine, send: Callable[[Event], None], stop_on_death: bool = False) -> None:
        self.engine = engine
        self.send = send
        self.stop_on_death = stop_on_death  # an engine process exits; a thread waits for Shutdown
        self.commands: queue.Queue[Command | LoadedLora] = queue.Queue()
        self.dead_reason: str | None = None
        self._held: list[RequestOutput] = []  # the last step's outputs, not yet sent
        # Adapter id -> (name, folder) as loaded. Several front ends (--api-server-count) each load the
        # --lora adapters under the same ids: the first load counts, the others find it loaded.
        self._lora_sources: dict[int, tuple[str, str]] = {}
        self._recorder = _StatsRecorder(engine.observer)
        engine.observer = self._recorder
        # Step records are built once the next step is queued on the GPU (off its critical path).
        engine.defer_observation = True

    def put(self, command: Command | LoadedLora) -> None:
        """Any thread: queue a command for the engine thread."""
        self.commands.put(command)

    def load_lora(self, command: AddLora) -> None:
        """The caller's thread (not the engine's): read the adapter's files, then queue the rest."""
        try:
            weights = load_adapter(self.engine, command.name, command.path)
        except (ValueError, FileNotFoundError) as exc:
            self.send(Reply(command.call_id, error=str(exc), is_value_error=True))
            return
        except Exception as exc:
            logger.exception("reading adapter %s failed", command.name)
            self.send(Reply(command.call_id, error=describe(exc)))
            return
        self.put(LoadedLora(command.call_id, command.adapter_id, weights))

    def run(self) -> None:
        """The engine thread's body; returns on Shutdown."""
        engine = self.engine
        while True:
            block = not engine.has_unfinished_requests
            if block:
                self._release_held()  # no step will launch soon: send the last outputs now
            if not self._apply_commands(block):
                self._release_held()
                return
            if not engine.has_unfinished_requests:
                continue
            try:
                # A step's outputs are sent once the *next* step is queued on the GPU: the front end
                # then streams them while the GPU works, not in the window where the GPU waits for
                # this thread between two steps.
                self._held = engine.step(on_launched=self._release_held)
            except Exception as exc:
                self._release_held()
                if is_out_of_memory(exc):  # this step's requests fail; the engine goes on
                    logger.error("out of device memory in a step; failing its requests: %s", exc)
                    self.send(StepOutputs(engine.fail_running(f"out of device memory: {exc}"[:500])))
                    release_cached_memory()
                    continue
                # Anything else is the engine's own (LLMEngine ends a request's failure with that
                # request): the model cannot be trusted to go on. Fail every request, never hang.
                logger.error("engine step failed:\n%s", traceback.format_exc())
                self.dead_reason = f"engine step failed: {type(exc).__name__}"
                self.send(Dead(self.dead_reason, engine.fail_all(self.dead_reason)))
                if not self.stop_on_death:
                    self._drain_after_death()
                return

    def _release_held(self) -> None:
        held, self._held = self._held, []
        try:
            self.engine.observe_deferred()  # the held step's record (its time is the step's end)
        except Exception:  # an observer's failure never costs a request its outputs
            logger.exception("recording step metrics failed")
        records, self._recorder.records = self._recorder.records, []
        if held or records:
            self.send(StepOutputs(held, records))

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands; wait for one when idle. False means shut down."""
        try:
            cmd = self.commands.get(block=block)
        except queue.Empty:
            return True
        rejected: list[RequestOutput] = []
        while True:
            if not isinstance(cmd, AddRequest):
                self._release_held()  # an abort or call must see the outputs before it sent
            if isinstance(cmd, Shutdown):
                self._send_rejected(rejected)
                return False
            self._apply(cmd, rejected)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
        self._send_rejected(rejected)
        return True

    def _apply(self, cmd: Command | LoadedLora, rejected: list[RequestOutput]) -> None:
        engine = self.engine
        if isinstance(cmd, AddRequest):
            try:
                engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.adapter_id, cmd.eos_token_ids,
                                   cmd.mm, cmd.system_prompt_end)
            except Exception as exc:  # this request's failure, whatever it is: never the engine thread's end
                if not isinstance(exc, ValueError):
                    logger.exception("adding request %s failed", cmd.request_id)
                error = str(exc) if isinstance(exc, ValueError) else describe(exc)
                rejected.append(RequestOutput(cmd.request_id, [], True, FinishReason.ERROR, error=error))
        elif isinstance(cmd, Abort):
            if not engine.abort(cmd.request_id, cmd.reason):
                # Finished already, or never reached the engine: end its stream anyway.
                rejected.append(RequestOutput(cmd.request_id, [], True, cmd.reason))
        elif isinstance(cmd, LoadedLora | RemoveLora):
            self._adapter_call(cmd)
        elif isinstance(cmd, AddLora):  # not read beforehand: read here (between steps)
            self.load_lora(cmd)

    def _adapter_call(self, cmd: LoadedLora | RemoveLora) -> None:
        mark = startup_clock.current().mark()
        try:
            if isinstance(cmd, LoadedLora):
                source = (cmd.weights.name, str(cmd.weights.path))
                if self._lora_sources.get(cmd.adapter_id) != source:  # already loaded: nothing to replace
                    self.engine.add_lora(cmd.adapter_id, cmd.weights)
                    self._lora_sources[cmd.adapter_id] = source
                result: int | None = cmd.weights.rank
            else:
                self.engine.remove_lora(cmd.adapter_id)
                self._lora_sources.pop(cmd.adapter_id, None)
                result = None
        except ValueError as exc:  # does not fit this model's slots
            self.send(Reply(cmd.call_id, error=str(exc), is_value_error=True))
        except Exception as exc:
            logger.exception("an adapter call failed")
            self.send(Reply(cmd.call_id, error=describe(exc)))
        else:
            self.send(Reply(cmd.call_id, result=result, startup_phases=startup_clock.current().since(mark)))

    def _send_rejected(self, rejected: list[RequestOutput]) -> None:
        if rejected:
            self.send(StepOutputs(rejected))

    def _drain_after_death(self) -> None:
        """After a fatal error, refuse whatever else arrives until shutdown."""
        reason = self.dead_reason or "the engine has stopped"
        while True:
            cmd = self.commands.get()
            if isinstance(cmd, Shutdown):
                return
            if isinstance(cmd, AddRequest):
                self.send(StepOutputs([RequestOutput(cmd.request_id, [], True, FinishReason.ERROR, error=reason)]))
            elif isinstance(cmd, LoadedLora | AddLora | RemoveLora):
                self.send(Reply(cmd.call_id, error=reason))


def release_cached_memory() -> None:
    if _ON_CUDA:
        torch.cuda.empty_cache()
