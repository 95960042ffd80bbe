"""The engine in its own process (the default --engine-mode): killed mid-stream, the front end ends
the open stream with an error event, answers 503, and exits non-zero within seconds, leaving no
process behind; on SIGTERM both processes drain and exit 0."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
from live_server import BASE_MODEL, LiveServer, launch

EXIT_WITHIN_S = 15  # generous for a busy 2-core CI machine; the server itself allows ~1 s


def engine_pid(server: LiveServer) -> int:
    """The engine process: the server's child started by multiprocessing's spawn (Linux /proc)."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in map(int, children):
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            return child
    raise AssertionError(f"no engine process among {children}")


def is_gone(pid: int) -> bool:
    """Not running, and not a zombie either (a reaped process has no /proc entry)."""
    return not Path(f"/proc/{pid}").exists()


def read_stream(server: LiveServer, max_tokens: int, events: list[str], errors: list[BaseException]) -> None:
    body = {"model": BASE_MODEL, "prompt": "Return the", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            events.extend(line[len("data: "):] for line in response.iter_lines() if line.startswith("data: "))
    except BaseException as exc:  # recorded for the test to show
        errors.append(exc)


def start_stream(server: LiveServer, max_tokens: int) -> tuple[threading.Thread, list[str], list[BaseException]]:
    events: list[str] = []
    errors: list[BaseException] = []
    thread = threading.Thread(target=read_stream, args=(server, max_tokens, events, errors))
    thread.start()
    deadline = time.monotonic() + 60
    while len(events) < 3 and time.monotonic() < deadline and not errors:
        time.sleep(0.02)
    assert len(events) >= 3, (errors, server.log_path.read_text()[-3000:])
    return thread, events, errors


def answers_after_death(server: LiveServer) -> list[httpx.Response]:
    """Requests sent until one gets 503 or the server is gone (it stays up a moment after the death,
    so that its streams' last events go out)."""
    answers: list[httpx.Response] = []
    deadline = time.monotonic() + EXIT_WITHIN_S
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            answers.append(httpx.post(f"{server.base_url}/completions", timeout=5,
                                      json={"model": BASE_MODEL, "prompt": "Hi", "max_tokens": 2}))
        except httpx.TransportError:
            break
        if answers[-1].status_code == 503:
            break
        time.sleep(0.01)
    return answers


def test_killed_engine_ends_open_streams_with_an_error_and_the_server_exits_nonzero(tmp_path: Path) -> None:
    server = launch(tmp_path, "engine-killed", demo_adapter=False)
    try:
        server.wait_ready()
        engine = engine_pid(server)
        thread, events, errors = start_stream(server, 1900)
        os.kill(engine, signal.SIGKILL)
        killed_at = time.monotonic()
        answers = answers_after_death(server)
        thread.join(timeout=30)
        assert not errors, errors
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
        error = json.loads(events[-2])["error"]
        assert "engine process exited unexpectedly (killed by SIGKILL)" in error["message"]
        assert error["type"] == "server_error"
        # Whatever it answered meanwhile: a 503 naming the death at the end, never a hang or a 200.
        assert answers and answers[-1].status_code == 503, [a.text for a in answers]
        assert "engine has stopped" in answers[-1].json()["error"]["message"]
        assert all(a.status_code != 200 for a in answers)
        assert server.process.wait(timeout=EXIT_WITHIN_S) == 1
        assert time.monotonic() - killed_at < EXIT_WITHIN_S
        assert is_gone(engine)
        log = server.log_path.read_text()
        assert "the engine process exited unexpectedly (killed by SIGKILL); ending every request" in log
    finally:
        if server.process.poll() is None:
            server.process.kill()


def test_sigterm_drains_through_the_engine_process_and_both_exit(tmp_path: Path) -> None:
    server = launch(tmp_path, "engine-drain", "--shutdown-timeout", "60", demo_adapter=False)
    try:
        server.wait_ready()
        engine = engine_pid(server)
        thread, events, errors = start_stream(server, 40)
        server.process.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert not errors, errors
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it ran to its end, not cut
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 3
        assert server.process.wait(timeout=30) == 0
        assert is_gone(engine)
    finally:
        if server.process.poll() is None:
            server.process.kill()
