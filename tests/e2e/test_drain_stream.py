"""A stream still running at the drain deadline (SIGTERM, then --shutdown-timeout) ends with an
error event then `data: [DONE]`, not a body that just stops; the server still exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
from live_server import BASE_MODEL, LiveServer, launch

NUM_STREAMS = 3


def read_stream(server: LiveServer, events: list[str], errors: list[BaseException]) -> None:
    # Long enough to outlast the drain deadline on any machine: ~2000 tokens, EOS ignored.
    body = {"model": BASE_MODEL, "prompt": "Return the", "max_tokens": 1900, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
    except BaseException as exc:  # recorded for the test to show
        errors.append(exc)


def test_stream_cut_at_the_drain_deadline_ends_with_an_error_event_then_done(tmp_path: Path) -> None:
    server = launch(tmp_path, "drain-cut", "--shutdown-timeout", "0.5")
    try:
        server.wait_ready()
        streams: list[list[str]] = [[] for _ in range(NUM_STREAMS)]
        errors: list[BaseException] = []
        threads = [threading.Thread(target=read_stream, args=(server, s, errors)) for s in streams]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not all(len(s) >= 3 for s in streams) and time.monotonic() < deadline and not errors:
            time.sleep(0.02)
        assert all(len(s) >= 3 for s in streams), (errors, [len(s) for s in streams])
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        for events in streams:
            assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
            error = json.loads(events[-2])["error"]
            assert error["type"] == "server_error" and error["code"] == 503
            assert "--shutdown-timeout" in error["message"] and "retry" in error["message"]
            chunks = [json.loads(e) for e in events[:-2]]
            assert chunks and all("choices" in c for c in chunks)
            assert not any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks), "finished before the cut"
        assert server.process.wait(timeout=30) == 0
        assert "ASGI callable returned without completing response" not in server.log_path.read_text()
    finally:
        if server.process.poll() is None:
            server.process.kill()
