"""Logging set-up: plain text or one JSON object a line (`--log-format json`, where library output
is routed through logging too), the access-log filter, and the one line
written for every finished request."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .startup_clock import STARTUP_LOGGER  # noqa: F401 (start-up messages log under it)

REQUEST_LOGGER = "sloth_serve.requests"
# Paths that load balancers and Prometheus poll every few seconds: left out of the access log.
PROBE_PATHS = ("/health", "/metrics")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...fields given as `extra={"fields": {...}}`}."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            body.update(fields)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


class ProbePathFilter(logging.Filter):
    """Drops uvicorn access-log records for the given paths (query strings ignored)."""

    def __init__(self, paths: Iterable[str]) -> None:
        super().__init__()
        self.paths = frozenset(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn.access logs with args (client, method, path?query, http version, status).
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            return args[2].partition("?")[0] not in self.paths
        return True


def configure_logging(level: str, fmt: str, *, access_log: bool = True,
                      quiet_paths: Iterable[str] = PROBE_PATHS, log_requests: bool = True) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn (Unsloth's, transformers') as log records
    access = logging.getLogger("uvicorn.access")
    access.filters[:] = [f for f in access.filters if not isinstance(f, ProbePathFilter)]
    access.addFilter(ProbePathFilter(quiet_paths))
    access.disabled = not access_log
    logging.getLogger(REQUEST_LOGGER).setLevel(logging.INFO if log_requests else logging.WARNING)


def quiet_progress_bars() -> None:
    """Progress bars redraw one line with carriage returns: noise in a log of JSON lines. Set before
    tqdm, huggingface_hub and transformers are imported (they read these once)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def capture_output() -> None:
    """Route everything later written to file descriptors 1 and 2 (print(), tqdm, C libraries,
    child processes) through a small pump process that writes each line as a JSON log record to
    the real stderr; log records go there directly. A separate process, so that what a crashing
    process writes last (a fatal error, faulthandler's traceback) still comes out."""
    sys.stdout.flush()
    sys.stderr.flush()
    real_stderr = os.dup(2)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(os.fdopen(os.dup(real_stderr), "w", buffering=1, encoding="utf-8", errors="replace"))
    pipes = [os.pipe(), os.pipe()]
    # The pump imports this module the way we did, wherever it is run from (the folder that holds the
    # package under its import name: an install, or links to a source checkout, so not resolved).
    package_root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    pump_process = subprocess.Popen(
        [sys.executable, "-m", "sloth_serve.logs", str(pipes[0][0]), str(pipes[1][0])],
        pass_fds=(pipes[0][0], pipes[1][0]), stdin=subprocess.DEVNULL, stdout=real_stderr, stderr=real_stderr,
        env=env, start_new_session=True,  # Ctrl-C in a terminal reaches our process group, not the pump
    )
    for fd, (read_end, write_end) in zip((1, 2), pipes, strict=True):
        os.close(read_end)
        os.dup2(write_end, fd)
        os.close(write_end)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # fd 1 is a pipe now
    # An uncaught exception as one record with its traceback, not one record per traceback line.
    uncaught = logging.getLogger("sloth_serve.uncaught")
    sys.excepthook = lambda kind, exc, tb: uncaught.critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))
    threading.excepthook = lambda args: uncaught.critical(
        "uncaught %s in thread %s", args.exc_type.__name__, args.thread.name if args.thread else "?",
        exc_info=args.exc_value)
    _release.append(lambda: _stop_pump(pump_process, real_stderr))
    atexit.register(release_output)


_release: list[Callable[[], None]] = []


def _stop_pump(pump_process: subprocess.Popen[bytes], real_stderr: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):  # our ends of the pipes close: the pump writes what is left and exits
        os.dup2(real_stderr, fd)
    # Wait before we exit: in a container the pump dies with process 1, losing what it holds
    # (not long: a child process of ours may still hold a pipe open).
    with contextlib.suppress(subprocess.TimeoutExpired):
        pump_process.wait(timeout=2)


def release_output() -> None:
    """Lets the pump finish (at exit, or before os._exit); later output goes to stderr as it is."""
    while _release:
        _release.pop()()


def output_lines(raw: bytes) -> Iterator[str]:
    """The text of captured output: ANSI colours dropped, and of a line redrawn with carriage
    returns (a progress bar) only its last state."""
    for line in raw.decode("utf-8", "replace").split("\n"):  # not splitlines(): it splits at \r too
        text = ANSI_ESCAPE.sub("", line.rstrip("\r").rpartition("\r")[2]).rstrip()
        if text.strip():
            yield text


def is_record(line: str) -> bool:
    """Whether a line of captured output is one of our JSON log records."""
    if not line.startswith('{"time"'):
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and {"level", "logger", "message"} <= record.keys()


def pump(stdout_fd: int, stderr_fd: int) -> None:
    """The pump process: lines from the two pipes become JSON records on its stdout until both close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it ends when the server's pipes close, not before
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging("debug", "json")
    loggers = {stdout_fd: (logging.getLogger("sloth_serve.stdout"), logging.INFO),
               stderr_fd: (logging.getLogger("sloth_serve.stderr"), logging.WARNING)}
    pending = dict.fromkeys(loggers, b"")
    selector = selectors.DefaultSelector()
    for fd in loggers:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    while selector.get_map():
        for key, _ in selector.select():
            fd = int(key.fd)
            chunk = os.read(fd, 65536)
            data = pending[fd] + chunk
            complete, _, pending[fd] = data.rpartition(b"\n") if chunk else (data, b"", b"")
            if len(pending[fd]) > 2**20:  # a line that never ends (a bar redrawn with \r only)
                complete, pending[fd] = complete + b"\n" + pending[fd], b""
            logger, level = loggers[fd]
            for text in output_lines(complete):
                if is_record(text):  # a JSON record already (the engine process logs its own): as it is
                    print(text, file=sys.stderr, flush=True)
                else:
                    logger.log(level, text)
            if not chunk:
                selector.unregister(fd)


def log_finished_request(fields: dict[str, Any]) -> None:
    """One line per finished request: id, model, token counts, TTFT, end-to-end time, finish reason."""
    logger = logging.getLogger(REQUEST_LOGGER)
    if not logger.isEnabledFor(logging.INFO):
        return
    text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    logger.info("finished %s", text, extra={"fields": fields})


if __name__ == "__main__":
    pump(int(sys.argv[1]), int(sys.argv[2]))
