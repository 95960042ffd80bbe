"""Live servers for the end-to-end tests: `python -m sloth_serve.cli` subprocesses on 127.0.0.1 serving the
embedded demo model (and its upper-case adapter as model "upper"), started once per session.

- `server`: the open server most tests talk to.
- `restricted_server`: `--api-key` and `--max-queued-requests 1`, for 401 and 503.
- `ahead_server`: `--async-scheduling`, whose clients must see what the open server's see.
All start together (model loading overlaps) and are stopped at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import API_KEY, LiveServer, launch
from openai import OpenAI


@pytest.fixture(scope="session")
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    tmp = tmp_path_factory.mktemp("servers")
    servers = {
        "open": launch(tmp, "open"),
        "restricted": launch(tmp, "restricted", "--max-queued-requests", "1", api_key=API_KEY),
        "ahead": launch(tmp, "ahead", "--async-scheduling"),
    }
    try:
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture(scope="session")
def server(_servers: dict[str, LiveServer]) -> LiveServer:
    _servers["open"].wait_ready()
    return _servers["open"]


@pytest.fixture(scope="session")
def restricted_server(_servers: dict[str, LiveServer]) -> LiveServer:
    _servers["restricted"].wait_ready()
    return _servers["restricted"]


@pytest.fixture(scope="session")
def client(server: LiveServer) -> OpenAI:
    return server.client()


@pytest.fixture(scope="session")
def ahead_server(_servers: dict[str, LiveServer]) -> LiveServer:
    _servers["ahead"].wait_ready()
    return _servers["ahead"]
