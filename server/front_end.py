"""One HTTP front end: the app under uvicorn, where SIGTERM drains and a signal that comes while the
model loads exits at once. The server runs one (server/startup.py), or --api-server-count of them
on one listening socket (server/api_servers.py)."""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

from .config import Config
from .logs import release_output
from .startup_clock import STARTUP_LOGGER, startup_phase

if TYPE_CHECKING:  # the engine's modules come after the start-up checks
    from .engine.client import EngineClient

logger = logging.getLogger(STARTUP_LOGGER)


def run_front_end(config: Config, engine: EngineClient | None, sock: socket.socket | None = None,
                  front_end: int = 0) -> int:
    """The app under uvicorn until a signal or the engine's end (serve's exit codes). `sock`: the
    listening socket the --api-server-count parent made (default: uvicorn binds --host/--port);
    `front_end`: this process's number among them."""
    with startup_phase("import torch and the server", "other"):
        import uvicorn

        from .api import create_app
        from .api.connections import uvicorn_options

    app = create_app(config, engine, front_end)
    state = app.state.server
    stopped_by: list[int] = []

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT first drain: new requests get 503 and /health turns 503 while in-flight
        requests finish (up to --shutdown-timeout); then uvicorn shuts down. A second signal exits now.
        While the model loads there is nothing to drain: the server stops at once."""

        def handle_exit(self, sig: int, frame: object) -> None:
            if sock is not None and sig == signal.SIGINT:
                return  # Ctrl-C reaches the whole process group: the parent passes it on as SIGTERM
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
    server.run(sockets=None if sock is None else [sock])
    if stopped_by and state.runtime is None:
        # The loader thread may be deep in Unsloth or torch (and their thread pools would hold up
        # a normal interpreter exit until the load ends): leave now.
        logger.warning("stopped by %s while loading the model", signal.Signals(stopped_by[0]).name)
        logging.shutdown()
        release_output()
        os._exit(128 + stopped_by[0])
    return 1 if state.load_error is not None or state.engine_dead is not None else 0
