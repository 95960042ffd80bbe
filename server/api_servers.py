"""--api-server-count N: this process makes the listening socket and starts the one engine process and N
front-end processes (uvicorn and the app each), which accept on that socket (the kernel spreads the
connections) and share the engine; then it watches them. SIGTERM or SIGINT drains every front end;
an engine that dies ends every front end's streams, and the server exits non-zero; a front end that
fails stops the others."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing import connection, get_context
from multiprocessing.process import BaseProcess
from types import FrameType

from . import startup_clock
from .config import Config
from .engine.process_client import STOP_TIMEOUT_S, spawn_engine
from .engine.shared_engine import SharedEngine
from .logs import configure_logging, quiet_progress_bars
from .startup_clock import STARTUP_LOGGER

logger = logging.getLogger(STARTUP_LOGGER)
ENGINE_DEATH_GRACE_S = 15.0  # the engine died: how long the front ends may take to end their streams and exit
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus_client's multiprocess mode keeps each process's values


def serve_many(config: Config) -> int:
    """serve()'s exit codes: 0 after a drain, 1 when the model failed to load, the engine died or a
    front end failed, 128 + the signal when stopped while loading."""
    import uvicorn

    # uvicorn's own binding (host names, IPv6, SO_REUSEADDR), once, for every front end.
    sock = uvicorn.Config("sloth_serve", host=config.host, port=config.port).bind_socket()
    work = tempfile.mkdtemp(prefix="sloth-servers-")
    metrics_dir = os.path.join(work, "metrics")
    os.mkdir(metrics_dir)
    # Read by prometheus_client when the front ends import it: their values go to files there.
    os.environ[METRICS_DIR_ENV] = metrics_dir
    count = config.api_server_count
    commands = [f"ipc://{work}/commands-{i}" for i in range(count)]
    events = [f"ipc://{work}/events-{i}" for i in range(count)]
    engine = spawn_engine(config, commands, events)
    context = get_context("spawn")
    front_ends: list[BaseProcess] = [
        context.Process(target=_front_end_main, name=f"sloth-api-server-{i}",
                        args=(config, sock, SharedEngine(engine.pid or 0, commands[i], events[i], i)))
        for i in range(count)]
    for process in front_ends:
        process.start()
    logger.info("%d API servers (pids %s) share the engine process %d", count,
                ", ".join(str(p.pid) for p in front_ends), engine.pid)
    try:
        return _watch(engine, front_ends)
    finally:
        sock.close()
        shutil.rmtree(work, ignore_errors=True)


def _watch(engine: BaseProcess, front_ends: list[BaseProcess]) -> int:
    signals: list[int] = []

    def forward(sig: int, frame: FrameType | None) -> None:
        # Each front end drains (a second signal: exits now); the engine stops once all have.
        signals.append(sig)
        _signal_all(front_ends, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    engine_died_at: float | None = None
    failed = False
    running = list(front_ends)
    while running:
        waits = [p.sentinel for p in running] + ([engine.sentinel] if engine_died_at is None else [])
        ready = connection.wait(waits, timeout=1.0)
        if engine_died_at is None and engine.sentinel in ready:
            # Not reaped yet: the front ends read its exit status (signal) in /proc meanwhile.
            engine_died_at = time.monotonic()
            if not signals:
                logger.error("the engine process %d exited; the API servers end their streams and exit", engine.pid)
        for process in [p for p in running if p.sentinel in ready]:
            process.join()
            running.remove(process)
            _forget_metrics(process)
            code = process.exitcode
            if code != 0 and not signals and engine_died_at is None and not failed:
                # The pid and the signal too: what an operator matches against the kernel's log (OOM killer).
                logger.error("API server %s (pid %s) %s; stopping the others", process.name, process.pid,
                             how_it_ended(code))
                failed = True
                _signal_all(running, signal.SIGTERM)
        if engine_died_at is not None and time.monotonic() - engine_died_at > ENGINE_DEATH_GRACE_S:
            _signal_all(running, signal.SIGKILL)
    codes = [p.exitcode for p in front_ends]
    _stop_engine(engine, wait=all(code == 0 for code in codes))
    stopped_while_loading = [c for c in codes if c is not None and c > 128]
    if stopped_while_loading:
        return stopped_while_loading[0]
    return 1 if failed or any(codes) else 0  # a dead engine: its front ends exit 1


def how_it_ended(exitcode: int | None) -> str:
    """A process's end as its exit code says: a signal by name where Python names it (real-time
    signals beyond SIGRTMIN have no name: their number), else the code."""
    if exitcode is None or exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"was killed by {name}"


def _stop_engine(engine: BaseProcess, wait: bool) -> None:
    """Every front end drained and said Shutdown (`wait`): the engine exits by itself. Otherwise it
    may be loading or waiting for a front end that is gone: stop it now."""
    if wait:
        engine.join(STOP_TIMEOUT_S)
        if engine.exitcode is None:
            logger.warning("the engine process did not stop within %.0fs; killing it", STOP_TIMEOUT_S)
    if engine.exitcode is None:
        engine.kill()
    engine.join(5)


def _signal_all(processes: list[BaseProcess], sig: int) -> None:
    for process in processes:
        if process.pid is not None and process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)


def _forget_metrics(process: BaseProcess) -> None:
    """An ended front end's per-process gauges no longer count in the sums."""
    from prometheus_client import multiprocess

    if process.pid is not None:
        multiprocess.mark_process_dead(process.pid, os.environ[METRICS_DIR_ENV])


def _front_end_main(config: Config, sock: socket.socket, shared: SharedEngine) -> None:
    """A front-end process: the app under uvicorn on the parent's socket, with the shared engine."""
    startup_clock.begin()
    if config.log_format == "json":
        quiet_progress_bars()
    configure_logging(config.log_level, config.log_format, access_log=config.access_log,
                      quiet_paths=config.access_log_skip_paths, log_requests=config.log_requests)
    from .engine.process_client import ProcessEngineClient
    from .front_end import run_front_end

    engine = ProcessEngineClient(config, shared)
    engine.spawn()
    sys.exit(run_front_end(config, engine, sock, shared.index))
