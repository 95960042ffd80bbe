"""The server's life: 503 while the model loads, then 200; when the engine dies, requests in flight
get a 500 (or an SSE error event then [DONE]) and /health says 503. Runs `create_app` under
uvicorn in a thread, its engine in a thread too (--engine-mode thread), so the test can hold the
loader back and break the engine on purpose. Also: the CLI exits non-zero when the model cannot load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from live_server import BASE_MODEL, REPO, free_port
from sse_client import read_events

import sloth_serve.engine.launch as launch_module
from sloth_serve.api import create_app
from sloth_serve.config import Config
from sloth_serve.loader import DEMO_MODEL

CHAT = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "ignore_eos": True}


class ThreadedServer:
    def __init__(self, config: Config) -> None:
        self.app = create_app(config)
        self.url = f"http://127.0.0.1:{config.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=config.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while httpx.get(f"{self.url}/health").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{self.url}/health").text
            time.sleep(0.05)


@pytest.fixture
def gated_loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Model loading waits until the test sets the returned event."""
    gate = threading.Event()
    real_engine = launch_module.LLMEngine

    def slow_engine(config: Config) -> object:
        gate.wait(timeout=60)
        return real_engine(config)

    monkeypatch.setattr(launch_module, "LLMEngine", slow_engine)
    yield gate
    gate.set()


def demo_config() -> Config:
    return Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=256, port=free_port(),
                  engine_mode="thread")


def test_health_is_503_while_loading_then_200(gated_loader: threading.Event) -> None:
    with ThreadedServer(demo_config()) as srv:
        loading = httpx.get(f"{srv.url}/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        refused = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["type"] == "server_error"
        gated_loader.set()
        srv.wait_ready()
        assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"


def test_prompt_larger_than_the_kv_cache_is_400() -> None:
    """A KV cache of 64 tokens lowers the model's max_model_len (2048) to 64 at start-up: /v1/models
    says so, and a longer request is a context-length 400 (no generation cut off where it
    outgrew the cache)."""
    config = Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=4, block_size=16, port=free_port(),
                    engine_mode="thread")
    with ThreadedServer(config) as srv:
        srv.wait_ready()
        assert httpx.get(f"{srv.url}/v1/models").json()["data"][0]["max_model_len"] == 64
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": BASE_MODEL, "prompt": [5] * 100, "max_tokens": 1})
        assert r.status_code == 400
        assert "maximum context length is 64 tokens" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": BASE_MODEL, "prompt": [5] * 10, "max_tokens": 60})
        assert r.status_code == 400 and "maximum context length is 64 tokens" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/completions",
                       json={"model": BASE_MODEL, "prompt": [5] * 10, "max_tokens": 54, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 54


def test_engine_death_fails_requests_in_flight_and_health_turns_503() -> None:
    with ThreadedServer(demo_config()) as srv:
        srv.wait_ready()
        runtime = srv.app.state.server.runtime
        async_engine = runtime.engine  # the engine client (a thread's: --engine-mode thread)

        def broken_step(on_launched=None) -> list:  # type: ignore[no-untyped-def]
            deadline = time.monotonic() + 10  # fail once both requests are in: each sees the death
            while len(async_engine.streams) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise RuntimeError("simulated device failure")

        async_engine.engine.step = broken_step

        def streamed() -> list[str]:
            with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status_code == 200
                return read_events(r)

        with ThreadPoolExecutor(2) as pool:
            events_future = pool.submit(streamed)
            whole = pool.submit(httpx.post, f"{srv.url}/v1/chat/completions", json=CHAT, timeout=30).result()
            events = events_future.result(timeout=30)

        assert whole.status_code == 500
        assert "engine step failed: RuntimeError" in whole.json()["error"]["message"]
        assert "Traceback" not in whole.text
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "engine step failed" in error["message"] and error["type"] == "server_error"
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        after = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT)
        assert after.status_code == 503 and "engine has stopped" in after.json()["error"]["message"]


def test_cli_exits_nonzero_when_the_model_cannot_load() -> None:
    cmd = [sys.executable, "-m", "sloth_serve.cli", "--model", "/nonexistent/model", "--port", str(free_port())]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert done.returncode == 2  # found by the start-up checks, before torch is imported
    assert "/nonexistent/model" in done.stderr


def test_cli_rejects_a_malformed_lora_flag() -> None:
    cmd = [sys.executable, "-m", "sloth_serve.cli", "--lora", "no-equals-sign"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert done.returncode == 2
    assert "--lora takes NAME=PATH" in done.stderr
