"""The front end's side of the engine process (server/engine/engine_process.py): spawns it, sends it
commands and receives its events over ZeroMQ (msgpack by msgspec; bench/engine_transport.py has the
measurements behind the choice), and watches it: if it dies, every open stream ends with an error,
`on_death` is called, and the process is reaped (no zombie). With --api-server-count N the parent
starts the engine process and N front ends share it: each front end's client is then given the
SharedEngine, binds its own sockets and watches the engine without owning it."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

import zmq
import zmq.asyncio

from .. import startup_clock
from ..config import Config
from .client import EngineClient, EngineDeadError, fail_calls, resolve_call
from .mm_inputs import MultiModalInputs
from .outputs import EngineInfo
from .sampling_params import SamplingParams
from .sequence import FinishReason
from .shared_engine import EngineWatch, SharedEngine
from .wire import (
    Abort,
    AdapterNamed,
    AdapterUnnamed,
    AddLora,
    AddRequest,
    Command,
    Dead,
    LoadFailed,
    Ready,
    RemoveLora,
    Reply,
    Shutdown,
    StepOutputs,
    command_codec,
    event_codec,
    for_wire,
)

logger = logging.getLogger(__name__)
STOP_TIMEOUT_S = 10.0  # Shutdown sent: how long the engine may take to exit before it is killed


def _engine_main(config: Config, commands: list[str], events: list[str], parent_pid: int) -> None:
    """The child's entry point; imported there by name, so this module stays light (no torch) and the
    engine can be spawned before the front end imports its own heavy modules."""
    from .engine_process import main

    main(config, commands, events, parent_pid)


class EngineLoadError(RuntimeError):
    """The engine process could not load the model (the message says why)."""


def spawn_engine(config: Config, commands: list[str], events: list[str]) -> BaseProcess:
    """Start the engine process with one pair of socket addresses per front end (it connects to them)."""
    # spawn, not fork: CUDA cannot be used in a forked child of a process that touched it.
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_engine_main, name="sloth-engine", args=(config, commands, events, os.getpid()))
    process.start()
    return process


class ProcessEngineClient(EngineClient):
    def __init__(self, config: Config, shared: SharedEngine | None = None) -> None:
        super().__init__()
        self.config = config
        self.shared = shared  # the engine another process started, or None: this client starts its own
        if shared is not None:
            self.front_end_index = shared.index
        self.process: BaseProcess | EngineWatch | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._dir = tempfile.mkdtemp(prefix="sloth-engine-")
        self._sync = zmq.Context()
        self._async = zmq.asyncio.Context()
        self._commands = self._sync.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.SNDHWM, 0)  # never drop or block: the engine reads everything
        self._events = self._async.socket(zmq.PULL)
        self._events.setsockopt(zmq.RCVHWM, 0)
        self._command_codec = command_codec()
        self._event_codec = event_codec()
        self._calls: dict[int, asyncio.Future[int | None]] = {}
        self._call_ids = itertools.count()
        self._receiver: asyncio.Task[None] | None = None
        self._exited: asyncio.Future[int] | None = None
        self._stopping = False

    def spawn(self) -> None:
        """Start the engine process (it loads the model meanwhile); `start` then waits for it. Called
        early by the CLI, so the model loads while this process imports the web stack."""
        if self.process is not None:
            return
        if self.shared is not None:
            self._commands.bind(self.shared.commands)
            self._events.bind(self.shared.events)
            self.process = EngineWatch(self.shared.pid)
            return
        commands, events = f"ipc://{self._dir}/commands", f"ipc://{self._dir}/events"
        self._commands.bind(commands)
        self._events.bind(events)
        self.process = spawn_engine(self.config, [commands], [events])
        atexit.register(self._kill)  # whatever way this process ends, the engine does not outlive it

    async def start(self) -> EngineInfo:
        loop = self.loop = asyncio.get_running_loop()
        self.spawn()
        assert self.process is not None
        self._exited = loop.create_future()
        loop.add_reader(self.process.sentinel, self._on_exit)
        logger.info("engine process %d %s", self.process.pid, "shared" if self.shared is not None else "started")
        first: asyncio.Future[Any] = asyncio.ensure_future(self._events.recv(copy=False))
        waits: list[asyncio.Future[Any]] = [first, self._exited]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            first.cancel()
            raise EngineLoadError(f"the engine process exited while loading ({self._exit_reason()})")
        event = self._event_codec.decode(first.result().buffer)
        if isinstance(event, LoadFailed):
            raise EngineLoadError(event.message)
        assert isinstance(event, Ready)
        startup_clock.current().extend(event.info.startup_phases)  # timed in the engine process
        self.stats = event.info.initial_stats(loop.time())
        self._receiver = asyncio.create_task(self._receive(), name="sloth-engine-events")
        return event.info

    async def stop(self) -> None:
        self._stopping = True
        process = self.process
        if isinstance(process, EngineWatch):
            # Shared: the engine stops once every front end has said so; its parent waits for it.
            if process.exitcode is None and self._receiver is not None:
                with contextlib.suppress(EngineDeadError):
                    self._send(Shutdown())
        elif process is not None and process.exitcode is None and self._receiver is None:
            self._kill()  # still loading: it reads no command until it is done, and nothing is lost
        elif process is not None and process.exitcode is None:
            with contextlib.suppress(EngineDeadError):  # gone meanwhile: nothing to tell
                self._send(Shutdown())
            if self._exited is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._exited), STOP_TIMEOUT_S)
            if process.exitcode is None:
                logger.warning("the engine process did not stop within %.0fs; killing it", STOP_TIMEOUT_S)
                self._kill()
        if self._receiver is not None:
            self._receiver.cancel()
        self._close()

    def _send_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: int,
                  eos_token_ids: frozenset[int] | None, mm: MultiModalInputs | None, system_prompt_end: int) -> None:
        self._send(AddRequest(request_id, prompt_token_ids, for_wire(params), adapter_id, eos_token_ids, mm,
                              system_prompt_end))

    def _send_abort(self, request_id: str, reason: FinishReason) -> None:
        with contextlib.suppress(EngineDeadError):  # a dead engine has nothing left to abort
            self._send(Abort(request_id, reason))

    async def add_lora(self, adapter_id: int, name: str, path: str, shared: bool = False) -> int:
        rank = await self._call(lambda call_id: AddLora(call_id, adapter_id, name, str(path), shared))
        assert rank is not None
        return rank

    async def remove_lora(self, adapter_id: int) -> None:
        await self._call(lambda call_id: RemoveLora(call_id, adapter_id))

    async def _call(self, make: Callable[[int], Command]) -> int | None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        assert self.loop is not None
        call_id = next(self._call_ids)
        future = self._calls[call_id] = self.loop.create_future()
        try:
            self._send(make(call_id))
        except EngineDeadError:
            self._calls.pop(call_id, None)
            if future.done():
                future.exception()  # failed with the others at the death: the raise here reports it
            raise
        return await future

    def _send(self, command: Command) -> None:
        """Never blocks. A PUSH socket with no peer blocks its sender: once the engine process is
        gone, its connection closes a moment before the loop runs `_on_exit`, and a request arriving
        in that moment would stop the event loop for good (no death noticed, every stream hung).
        Without a peer the send fails at once, and the engine's death is handled here instead."""
        try:
            self._commands.send(self._command_codec.encode(command), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if self.dead_reason is None and self.process is not None and not self._stopping:
                self.process.join(2)  # it is gone (or going): its connection is
                if self.process.exitcode is not None and self._exited is not None:
                    self._on_exit()
                else:
                    reason = "the engine process stopped reading commands (its connection closed)"
                    logger.error("%s; ending every request", reason)
                    self._die(reason)
                    fail_calls(self._calls, reason)
            raise EngineDeadError(self.dead_reason or "the engine process is not connected") from None

    async def _receive(self) -> None:
        while True:
            frame = await self._events.recv(copy=False)
            self._dispatch(self._event_codec.decode(frame.buffer))

    def _dispatch(self, event: object) -> None:
        if isinstance(event, StepOutputs):
            self._on_outputs(event)
        elif isinstance(event, Reply):
            startup_clock.current().extend(event.startup_phases)  # an adapter's first load (graphs, kernels)
            resolve_call(self._calls, event)
        elif isinstance(event, AdapterNamed | AdapterUnnamed):
            self._on_adapter_news_event(event)
        elif isinstance(event, Dead):
            logger.error("the engine stopped: %s", event.reason)
            self._die(event.reason, event.outputs)
            fail_calls(self._calls, event.reason)

    # --- the process's end ------------------------------------------------------------------------

    def _on_exit(self) -> None:
        """The process ended (the sentinel became readable): reap it, and unless it was told to
        stop, treat it as the engine's death once its last events are read."""
        assert self.loop is not None and self.process is not None and self._exited is not None
        self.loop.remove_reader(self.process.sentinel)
        # Reaps it (no zombie). Its pipe closes a moment before it can be reaped: wait that moment.
        self.process.join(2)
        if not self._exited.done():
            self._exited.set_result(self.process.exitcode or 0)
        if not self._stopping and self._receiver is not None:
            self._receiver.cancel()
            self._read_last_words()
            reason = f"the engine process exited unexpectedly ({self._exit_reason()})"
            if self.dead_reason is None:
                logger.error("%s; ending every request", reason)
            self._die(reason)
            fail_calls(self._calls, reason)

    def _read_last_words(self) -> None:
        """The events it sent before it ended and not yet read (its outputs, Dead): read them now."""
        socket: zmq.Socket[bytes] = zmq.Socket.shadow(self._events.underlying)  # the same socket, no waiting
        while True:
            try:
                frame = socket.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._dispatch(self._event_codec.decode(frame.buffer))

    def _exit_reason(self) -> str:
        code = self.process.exitcode if self.process is not None else None
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def _kill(self) -> None:
        process = self.process
        if isinstance(process, BaseProcess) and process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.join(5)

    def _close(self) -> None:
        if self.loop is not None and self.process is not None and not self.loop.is_closed():
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.process.sentinel)
        # A shared engine is told Shutdown just before: let it go out (an own engine is gone by now).
        self._commands.close(linger=1000 if self.shared is not None else 0)
        self._events.close(linger=0)
        self._sync.term()
        self._async.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        if isinstance(self.process, EngineWatch):
            self.process.close()
        atexit.unregister(self._kill)
