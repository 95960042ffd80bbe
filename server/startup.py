"""From a Config to a serving process: logging, the start-up checks (before torch is imported), then
the engine process and the front end (server/front_end.py), or --api-server-count front ends
(server/api_servers.py)."""

from __future__ import annotations

import logging
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
    if config.api_server_count > 1:
        from .api_servers import serve_many

        return serve_many(config)
    engine = None
    if config.engine_mode == "process":  # the engine process loads the model while we import
        from .engine.process_client import ProcessEngineClient

        engine = ProcessEngineClient(config)
        engine.spawn()
    from .front_end import run_front_end

    return run_front_end(config, engine)
