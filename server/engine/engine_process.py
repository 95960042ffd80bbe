"""The engine process: the GPU owner. It loads the model, then runs the engine loop on its main thread
while a second thread receives the front end's commands (ZeroMQ) and compiles their grammars; every
event goes back on one socket. It ignores SIGTERM and SIGINT (the front end drains, then sends
Shutdown) and exits by itself if its parent is gone, so it never outlives it. With several front
ends (--api-server-count) each has its own pair of sockets, and a ClientRouter sends each request's
outputs to the front end that sent it."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import msgspec
import zmq

from .. import startup_clock
from ..config import Config
from ..loader.tokenizer import base_tokenizer_folder, load_tokenizer
from ..logs import configure_logging
from ..startup_clock import Phase
from .client_router import ClientRouter
from .engine_loop import EngineLoop, engine_info
from .grammar import GrammarCompiler, GrammarError
from .llm_engine import LLMEngine
from .wire import AddLora, AddRequest, Command, Event, LoadFailed, Ready, command_codec, event_codec

logger = logging.getLogger(__name__)
PARENT_POLL_S = 0.5


class EventSender:
    """The sockets events leave by, one per front end; the engine thread, the command thread and
    adapter readers share them. With one front end every event goes to it as it is."""

    def __init__(self, sockets: list[zmq.Socket]) -> None:  # type: ignore[type-arg]
        self.sockets = sockets
        self.codec = event_codec()
        self.lock = threading.Lock()
        self.router = ClientRouter(len(sockets)) if len(sockets) > 1 else None

    def __call__(self, event: Event) -> None:
        with self.lock:
            if self.router is None:
                self.sockets[0].send(self.codec.encode(event), copy=False)
                return
            for client, part in self.router.event(event):
                self.sockets[client].send(self.codec.encode(part), copy=False)

    def command(self, client: int, command: Command) -> Command | None:
        """A front end's command as the engine should see it (the command thread); None: none."""
        if self.router is None:
            return command
        with self.lock:
            command_out, answers = self.router.command(client, command)
            for to, event in answers:
                self.sockets[to].send(self.codec.encode(event), copy=False)
        return command_out


def main(config: Config, commands_addresses: list[str], events_addresses: list[str], parent_pid: int) -> None:
    """`commands_addresses[i]` and `events_addresses[i]`: front end i's sockets (one pair per front end)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # With --log-format json, fd 2 is the front end's output pump, which passes JSON records through.
    configure_logging(config.log_level, config.log_format, access_log=False, log_requests=False)
    # The interpreter's start and the imports (torch, the engine), before anything could log.
    clock = startup_clock.current()
    startup_clock.record_phase(Phase("engine process: start, import torch and the engine", "other", clock.elapsed()))
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="sloth-parent-watch", daemon=True).start()
    context = zmq.Context()
    events, commands = [], []
    for events_address, commands_address in zip(events_addresses, commands_addresses, strict=True):
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 5000)  # at exit, what is queued (the last outputs, Dead) still goes
        if len(events_addresses) > 1:
            # A front end that died leaves its socket unread while the others drain: its events queue
            # (for that drain's length) instead of blocking the engine thread once 1,000 are queued.
            socket.setsockopt(zmq.SNDHWM, 0)
        socket.connect(events_address)
        events.append(socket)
        socket = context.socket(zmq.PULL)
        socket.connect(commands_address)
        commands.append(socket)
    send = EventSender(events)
    try:
        engine = LLMEngine(config)
        info = engine_info(engine)
        folder = base_tokenizer_folder(Path(info.folder), engine.loaded.adapter_folder)
        with startup_clock.startup_phase("engine process: tokenizer and grammar vocabulary", "other"):
            engine.runner.sampler.set_tokenizer(load_tokenizer(folder), info.vocab_size, info.eos_token_ids)
    except Exception as exc:
        logger.error("loading %s failed: %s: %s", config.model, type(exc).__name__, exc,
                     exc_info=logger.isEnabledFor(logging.DEBUG))
        send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        _close(context, *events, *commands)
        os._exit(1)
    core = EngineLoop(engine, send, stop_on_death=True)
    done = threading.Event()
    receiver = threading.Thread(target=_receive, args=(core, send, commands, done), name="sloth-commands",
                                daemon=True)
    receiver.start()
    send(Ready(info))
    core.run()
    done.set()
    receiver.join(timeout=5)
    _close(context, *events, *commands)
    # os._exit: no interpreter teardown (CUDA, thread pools) that could hang a dying engine.
    os._exit(1 if core.dead_reason is not None else 0)


def _receive(core: EngineLoop, send: EventSender, sockets: list[zmq.Socket],  # type: ignore[type-arg]
             done: threading.Event) -> None:
    """Commands to the engine loop until it has stopped. Grammars are compiled here, off the engine
    thread; adapter files are read in a thread of their own, so requests do not wait behind them."""
    codec = command_codec()
    compiler = core.engine.runner.sampler.grammar
    poller = zmq.Poller()
    for socket in sockets:
        poller.register(socket, zmq.POLLIN)
    while not done.is_set():
        # A timeout, to see `done` (these sockets are this thread's alone).
        for socket, _ in poller.poll(100):
            while True:
                try:
                    frame = socket.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                command = send.command(sockets.index(socket), codec.decode(frame.buffer))
                if command is not None:
                    _apply(core, compiler, command)


def _apply(core: EngineLoop, compiler: GrammarCompiler | None, command: Command) -> None:
    if isinstance(command, AddRequest) and command.params.structured is not None and compiler is not None:
        try:
            spec = replace(command.params.structured, compiled=compiler.compile(command.params.structured))
            command = msgspec.structs.replace(command, params=replace(command.params, structured=spec))
        except GrammarError:
            pass  # the sampler fails this request with the grammar's message at its first token
    if isinstance(command, AddLora):
        threading.Thread(target=core.load_lora, args=(command,), name="sloth-adapter", daemon=True).start()
    else:
        core.put(command)


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    logger.error("the front end (pid %d) is gone; the engine process exits", parent_pid)
    os._exit(1)


def _close(context: zmq.Context, *sockets: zmq.Socket) -> None:  # type: ignore[type-arg]
    for socket in sockets:
        socket.close()
    context.term()
