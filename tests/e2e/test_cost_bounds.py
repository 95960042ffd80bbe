"""What a request may cost is bounded before the work is done, on the live server: prompts too long
in characters are refused before tokenizing (four concurrent 10 MB prompts once took a server from
1.7 to 9.1 GB), bodies are limited to what the context allows, each prompt x n counts against the
queue, --max-queued-tokens has a default, and connections that never finish their headers or sit
idle are closed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from live_server import BASE_MODEL, LiveServer, launch

MAX_MODEL_LEN = 2048  # the demo model's
NUM_KV_TOKENS = 512 * 16  # launch's --num-kv-blocks x the default block size
MAX_QUEUED = 32  # --max-queued-requests of `bounded`
HEADER_TIMEOUT = 1.0
KEEP_ALIVE_TIMEOUT = 1.0
SLACK_S = 2.5  # a loaded 2-core CI machine
TEN_MB = "hello world " * (10_000_000 // 12)
LONG = {"max_tokens": 1500, "ignore_eos": True}  # far longer than any test waits for


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # A small queue, short connection timeouts, and bodies up to 64 MiB as an operator might allow,
    # so that 10 MB prompts reach the character check (the default body limit is tested on `server`).
    server = launch(tmp_path_factory.mktemp("cost"), "bounded", "--max-queued-requests", str(MAX_QUEUED),
                    "--header-timeout", str(HEADER_TIMEOUT), "--keep-alive-timeout", str(KEEP_ALIVE_TIMEOUT),
                    "--max-request-bytes", str(64 * 2**20))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def post(server: LiveServer, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=120)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    return response.json()["error"]  # type: ignore[no-any-return]


def rss_mb(server: LiveServer) -> float:
    with open(f"/proc/{server.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def small_completion(**fields: Any) -> dict[str, Any]:
    return {"model": BASE_MODEL, "prompt": "Once upon", "max_tokens": 4, **fields}


# --- characters before tokens --------------------------------------------------------------------


def test_four_concurrent_10mb_prompts_are_400s_without_the_memory(bounded: LiveServer) -> None:
    before = rss_mb(bounded)
    peak, results = before, []
    bodies = [{"model": BASE_MODEL, "prompt": TEN_MB, "max_tokens": 4}] * 3
    bodies.append({"model": BASE_MODEL, "messages": [{"role": "user", "content": TEN_MB}], "max_tokens": 4})

    def send(body: dict[str, Any]) -> None:
        results.append(post(bounded, "/chat/completions" if "messages" in body else "/completions", body))

    threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_mb(bounded))
        time.sleep(0.02)
    assert peak - before < 500, f"RSS went from {before:.0f} to {peak:.0f} MB"
    assert len(results) == 4
    for response in results:
        err = error_of(response, 400)
        assert err["code"] == "context_length_exceeded" and err["param"] in ("prompt", "messages")
        assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"]
        assert f"{len(TEN_MB)} characters" in err["message"]
    assert post(bounded, "/completions", small_completion()).status_code == 200


def test_default_body_limit_follows_the_context(server: LiveServer) -> None:
    """On the session's server, which has the default limits."""
    # 10 MB is far more than any prompt that fits 2048 tokens: 413, its body never read.
    err = error_of(post(server, "/completions", {"model": BASE_MODEL, "prompt": TEN_MB}), 413)
    assert err["code"] == "request_too_large" and "--max-request-bytes" in err["message"]
    limit = int(err["message"].split("limit of ")[1].split()[0])
    assert limit < 2 * 2**20  # the context's characters at 4 bytes each, plus 1 MiB
    # Within the body limit but over the characters 2048 tokens can hold: 400 before tokenizing.
    too_long = "x" * (limit // 5)
    err = error_of(post(server, "/completions", {"model": BASE_MODEL, "prompt": ["hi", too_long]}), 400)
    assert err["param"] == "prompt[1]" and err["code"] == "context_length_exceeded"
    err = error_of(httpx.post(f"{server.url}/tokenize", json={"prompt": too_long}, timeout=60), 400)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    # A prompt filling the context with the demo vocabulary's 16-character "=" token: 2000 tokens of
    # 32000 characters, neither over the character limit nor over the body limit.
    dense = {"model": BASE_MODEL, "prompt": "=" * 16 * 2000, "max_tokens": 2}
    r = post(server, "/completions", dense)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2000, r.text


# --- prompts x n against the queue ---------------------------------------------------------------


def test_twenty_thousand_prompts_are_refused_at_once_and_others_are_served(bounded: LiveServer) -> None:
    start = time.monotonic()
    err = error_of(post(bounded, "/completions", {"model": BASE_MODEL, "prompt": ["hi"] * 20_000, "max_tokens": 4}),
                   400)
    assert err["param"] == "prompt" and "at most 1024 prompts" in err["message"]
    assert time.monotonic() - start < 10
    start = time.monotonic()
    assert post(bounded, "/completions", small_completion()).status_code == 200
    assert time.monotonic() - start < 10


def test_each_prompt_counts_once_per_choice_against_the_queue(bounded: LiveServer) -> None:
    err = error_of(post(bounded, "/completions", small_completion(prompt=["a", "b", "c", "d"], n=9)), 400)
    assert err["code"] == "too_many_queued_requests" and "36 completions" in err["message"]
    url = f"{bounded.base_url}/completions"
    held = small_completion(prompt=["a", "b", "c"], n=8, stream=True, **LONG)  # 24 engine requests
    with httpx.stream("POST", url, json=held, timeout=60) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith("data: {")
        assert bounded.health()["num_requests_in_flight"] == 3 * 8
        r = post(bounded, "/completions", small_completion(n=9))  # 24 + 9 > 32
        err = error_of(r, 503)
        assert err["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        assert post(bounded, "/completions", small_completion(n=8)).status_code == 200  # 24 + 8 fits
        time.sleep(HEADER_TIMEOUT + 0.5)  # a response outliving --header-timeout is not cut
        more = [line for line in (next(lines) for _ in range(6)) if line]
        assert more and all(line.startswith("data: {") for line in more)
    deadline = time.monotonic() + 10
    while (r := post(bounded, "/completions", small_completion(n=9))).status_code == 503:
        assert time.monotonic() < deadline, "the stream's slots were not released"
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def test_default_token_budget_is_twice_the_kv_cache(bounded: LiveServer) -> None:
    budget = 2 * NUM_KV_TOKENS
    n = budget // 1000 + 1
    err = error_of(post(bounded, "/completions", small_completion(prompt=[5] * 1000, n=n)), 400)
    assert err["code"] == "too_many_queued_tokens" and f"at most {budget}" in err["message"]
    fits = small_completion(prompt=[5] * 1000, n=n - 1, max_tokens=1)
    assert post(bounded, "/completions", fits).status_code == 200


# --- connection timeouts -------------------------------------------------------------------------


def seconds_until_closed(server: LiveServer, *sends: bytes, pause: float = 0.0) -> float:
    """Open a raw connection, send `sends` (`pause` apart), then wait for the server to close it."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 10) as sock:
        start = time.monotonic()
        try:
            for data in sends:
                sock.sendall(data)
                time.sleep(pause)
            while sock.recv(65536):  # a response, if any, then the close
                pass
        except (BrokenPipeError, ConnectionResetError):  # closed while we were still sending
            pass
        return time.monotonic() - start


def test_headers_never_finished_are_closed_within_the_timeout(bounded: LiveServer) -> None:
    partial = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    assert seconds_until_closed(bounded, partial) < HEADER_TIMEOUT + SLACK_S
    assert seconds_until_closed(bounded) < HEADER_TIMEOUT + SLACK_S  # nothing sent at all
    # One header byte every 0.2 s keeps no timer alive: the limit is on the whole header.
    trickle = [bytes([b]) for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100]
    assert seconds_until_closed(bounded, *trickle, pause=0.2) < HEADER_TIMEOUT + 0.2 * 5 + SLACK_S
    assert post(bounded, "/completions", small_completion()).status_code == 200


def test_idle_keep_alive_connections_are_closed(bounded: LiveServer) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    elapsed = seconds_until_closed(bounded, request)
    assert KEEP_ALIVE_TIMEOUT * 0.8 < elapsed < KEEP_ALIVE_TIMEOUT + SLACK_S
    with httpx.Client(base_url=bounded.url, timeout=10) as client:  # keep-alive reuse still works
        assert [client.get("/health").status_code for _ in range(3)] == [200] * 3
