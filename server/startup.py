"""From a Config to a serving process: logging, the start-up checks (before torch is imported), then
the app under uvicorn, where SIGTERM drains and a signal that comes while the model loads exits at once."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from . import compile_cache, startup_clock
from .config import Config
from .loader.prefetch import prefetch_weights
from .logs import (
    JsonFormatter,
    capture_output,
    configure_logging,
    quiet_progress_bars,
    release_output,
)
from .preflight import StartupError, run_checks
from .startup_clock import STARTUP_LOGGER, startup_phase

logger = logging.getLogger(STARTUP_LOGGER)
EXIT_USAGE = 2  # as argparse: the server cannot start as configured


def startup_error_line(message: str, log_format: str, exc: BaseException | None = None) -> str:
    """The one line a start-up error is: argparse's style, or a JSON record with --log-format json."""
    if log_format != "json":
        return f"sloth-serve: error: {message}"
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.LogRecord(STARTUP_LOGGER, logging.ERROR, __file__, 0, "%s", (message,), exc_info)
    return JsonFormatter().format(record)


def report_startup_error(exc: BaseException, log_level: str, log_format: str) -> int:
    """One line on stderr; with --log-level debug the traceback too."""
    debug = log_level == "debug"
    if debug and log_format != "json":
        traceback.print_exception(exc)
    print(startup_error_line(str(exc), log_format, exc if debug else None), file=sys.stderr, flush=True)
    return EXIT_USAGE


def serve(config: Config) -> int:
    """Check, then serve until a signal: 0 after a drain, 1 when the model failed to load or the
    engine process died, 2 when a start-up check failed, 128 + the signal when stopped while loading.
    With --precompile-only: check, compile the kernels into the cache, and exit."""
    startup_clock.begin()  # from the process's start: the summary line counts the interpreter's too
    json_lines = config.log_format == "json"
    if json_lines:
        quiet_progress_bars()
    configure_logging(config.log_level, config.log_format, access_log=config.access_log,
                      quiet_paths=config.access_log_skip_paths, log_requests=config.log_requests)
    try:
        with startup_phase("checks (model folder, adapters, device, port)"):
            summary = run_checks(config, config.served_model_name or Path(config.model).name)
            # Before the engine process is spawned (it inherits the variables) and Triton is imported.
            caches, warnings = compile_cache.prepare(config.compile_cache_dir)
    except (StartupError, ValueError) as exc:
        return report_startup_error(exc, config.log_level, config.log_format)
    logger.info("model %s", summary)
    for warning in warnings:
        logger.warning("%s", warning)
    logger.info("%s", compile_cache.describe(caches))
    if config.precompile_only:
        from .precompile import precompile

        return precompile(config, caches)
    if json_lines:
        capture_output()  # print(), tqdm, C libraries: every line on stderr is JSON from here on
    # The disk reads the weights into the page cache while torch and Unsloth are imported.
    prefetch_weights(config.model)
    engine = None
    if config.engine_mode == "process":  # the engine process loads the model while we import
        from .engine.process_client import ProcessEngineClient

        engine = ProcessEngineClient(config)
        engine.spawn()
    with startup_phase("import torch and the server", "other"):
        import uvicorn

        from .api import create_app
        from .api.connections import uvicorn_options

    app = create_app(config, engine)
    state = app.state.server
    stopped_by: list[int] = []

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT first drain: new requests get 503 and /health turns 503 while in-flight
        requests finish (up to --shutdown-timeout); then uvicorn shuts down. A second signal exits now.
        While the model loads there is nothing to drain: the server stops at once."""

        def handle_exit(self, sig: int, frame: object) -> None:
            if state.runtime is None and state.load_error is None:
                stopped_by.append(sig)
                self.should_exit = True
            elif state.draining or state.runtime is None:
                super().handle_exit(sig, frame)  # type: ignore[arg-type]
            else:
                state.begin_drain(config.shutdown_timeout)

        async def on_tick(self, counter: int) -> bool:
            if state.drained:
                self.should_exit = True
            return await super().on_tick(counter)

    server = DrainingServer(
        uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                       timeout_graceful_shutdown=5, log_config=None, access_log=config.access_log,
                       **uvicorn_options(config.header_timeout, config.keep_alive_timeout))
    )
    state.on_fatal = lambda: setattr(server, "should_exit", True)  # a failed load or a dead engine process
    server.run()
    if stopped_by and state.runtime is None:
        # The loader thread may be deep in Unsloth or torch (and their thread pools would hold up
        # a normal interpreter exit until the load ends): leave now.
        logger.warning("stopped by %s while loading the model", signal.Signals(stopped_by[0]).name)
        logging.shutdown()
        release_output()
        os._exit(128 + stopped_by[0])
    return 1 if state.load_error is not None or state.engine_dead is not None else 0
