"""Request limits on the live server: the prompt-token budget of admission (--max-queued-tokens),
caps on stop strings and stop token ids, and per-request deadlines (--request-timeout and the body's
`timeout`): 408 or an SSE error event, the engine request aborted, nothing left running or held."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from live_server import BASE_MODEL, LiveServer, launch
from prometheus_client.parser import text_string_to_metric_families
from sse_client import read_events

BUDGET = 100  # --max-queued-tokens of limits_server
SERVER_TIMEOUT = 3.0  # --request-timeout of limits_server
LONG = {"max_tokens": 1500, "ignore_eos": True}  # far longer than any test waits for


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # One sequence at a time, so that a second admitted request waits in the engine's queue.
    server = launch(tmp_path_factory.mktemp("limits"), "limits", "--max-queued-tokens", str(BUDGET),
                    "--request-timeout", str(SERVER_TIMEOUT), "--max-num-seqs", "1")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def completion(num_prompt_tokens: int, **fields: Any) -> dict[str, Any]:
    """A completion request whose prompt is exactly `num_prompt_tokens` token ids."""
    return {"model": BASE_MODEL, "prompt": [5] * num_prompt_tokens, "max_tokens": 2, **fields}


def post(server: LiveServer, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=30, **kwargs)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def tokens_in_flight(server: LiveServer) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "sloth:num_prompt_tokens_in_flight":
            return family.samples[0].value
    raise AssertionError("sloth:num_prompt_tokens_in_flight is not exported")


def wait_idle(server: LiveServer, timeout: float = 20) -> dict[str, Any]:
    """Health once nothing runs, waits or holds a KV block (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        busy = health["num_running"] or health["num_waiting"] or health["kv_cache_usage"]
        if not (busy or health["num_requests_in_flight"]) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def assert_idle(server: LiveServer) -> None:
    health = wait_idle(server)
    assert health["num_running"] == 0 and health["num_waiting"] == 0, health
    assert health["kv_cache_usage"] == 0 and health["num_free_blocks"] == health["num_blocks"], health
    assert health["num_requests_in_flight"] == 0, health


# --- the prompt-token budget ---------------------------------------------------------------------


def test_request_over_the_whole_token_budget_is_400(limits_server: LiveServer) -> None:
    err = error_of(post(limits_server, "/completions", completion(BUDGET + 1)), 400)
    assert err["param"] == "prompt" and err["code"] == "too_many_queued_tokens"
    assert f"{BUDGET + 1} prompt tokens" in err["message"] and f"at most {BUDGET}" in err["message"]
    # Each choice is its own engine request: its prompt counts once per choice.
    err = error_of(post(limits_server, "/completions", completion(60, n=2)), 400)
    assert "120 prompt tokens" in err["message"]
    chat = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 2}
    assert error_of(post(limits_server, "/chat/completions", chat), 400)["param"] == "messages"
    assert post(limits_server, "/completions", completion(BUDGET)).status_code == 200  # exactly the budget fits


def test_budget_full_is_503_while_the_admitted_stream_runs_on(limits_server: LiveServer) -> None:
    url = f"{limits_server.base_url}/completions"
    with httpx.stream("POST", url, json=completion(60, stream=True, **LONG), timeout=30) as held:
        assert held.status_code == 200
        lines = held.iter_lines()
        assert next(lines).startswith("data: {")  # admitted and generating: 60 tokens held
        assert tokens_in_flight(limits_server) == 60
        r = post(limits_server, "/completions", completion(50))  # 60 + 50 > 100
        err = error_of(r, 503)
        assert int(r.headers["retry-after"]) >= 1 and err["code"] == "overloaded" and err["type"] == "server_error"
        assert "60 prompt tokens in flight" in err["message"] and f"limit of {BUDGET}" in err["message"]
        with pytest.raises(openai.InternalServerError):
            limits_server.client().completions.create(**completion(50))
        # 40 more fit the budget: admitted, then waits behind the held stream for the only sequence
        # slot until its own deadline, which counts queue time.
        start = time.monotonic()
        err = error_of(post(limits_server, "/completions", completion(40, timeout=0.5)), 408)
        assert err["code"] == "request_timeout" and time.monotonic() - start < 2.5
        # The admitted stream is unaffected by any of it.
        more = [line for line in (next(lines) for _ in range(12)) if line]
        assert more and all(line.startswith('data: {"id"') for line in more), more
    # Its client hung up: its tokens are released and the 50-token request is admitted.
    deadline = time.monotonic() + 10
    while (r := post(limits_server, "/completions", completion(50))).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert_idle(limits_server)


def test_no_tokens_leak_after_many_requests_and_cancelled_streams(limits_server: LiveServer) -> None:
    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=limits_server.base_url, timeout=30) as client:

            async def cancelled_stream(i: int) -> str:
                path = "/completions" if i % 2 else "/chat/completions"
                body = completion(8, stream=True, **LONG) if i % 2 else {
                    "model": BASE_MODEL, "messages": [{"role": "user", "content": f"hi {i}"}], "stream": True, **LONG}
                try:
                    async with asyncio.timeout(0.4):  # the client gives up, mid-stream or queued
                        async with client.stream("POST", path, json=body) as r:
                            if r.status_code != 200:
                                return f"status_{r.status_code}"
                            async for _ in r.aiter_lines():
                                pass
                    return "finished"
                except TimeoutError:
                    return "cancelled"

            async def gone_client(i: int) -> str:  # non-streamed, client hangs up
                try:
                    r = await client.post("/completions", json=completion(8, **LONG), timeout=0.3)
                    return f"status_{r.status_code}"
                except httpx.TimeoutException:
                    return "cancelled"

            async def short(i: int, **fields: Any) -> str:
                r = await client.post("/completions", json=completion(8, **fields))
                return f"status_{r.status_code}"

            outcomes: list[str] = []
            for i in range(6):  # rounds of requests that together fit the budget (503s allowed)
                outcomes += await asyncio.gather(
                    cancelled_stream(2 * i), cancelled_stream(2 * i + 1), gone_client(i),
                    short(i, timeout=0.2, **LONG),  # past its deadline: 408
                    short(i), short(i, prompt=[5] * (BUDGET + 1)),  # 400 after admission
                    short(i, max_tokens=10**6),  # over the context length: 400
                )
            return outcomes

    outcomes = asyncio.run(main())
    assert "cancelled" in outcomes and "status_408" in outcomes and "status_400" in outcomes, outcomes
    assert set(outcomes) <= {"cancelled", "finished", "status_200", "status_400", "status_408", "status_503"}
    assert_idle(limits_server)
    assert tokens_in_flight(limits_server) == 0
    assert post(limits_server, "/completions", completion(BUDGET)).status_code == 200  # the whole budget is free


# --- caps on stop conditions ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_stop_caps_are_400_naming_the_numbers(server: LiveServer, path: str) -> None:
    base: dict[str, Any] = {"model": BASE_MODEL, "max_tokens": 2}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if path == "/chat/completions" else {"prompt": "hi"}
    err = error_of(post(server, path, {**base, "stop": [f"s{i}" for i in range(17)]}), 400)
    assert err["param"] == "stop" and "16" in err["message"] and "17" in err["message"]
    err = error_of(post(server, path, {**base, "stop": ["ok", "x" * 257]}), 400)
    assert err["param"] == "stop" and "256" in err["message"] and "257" in err["message"] and "stop[1]" in err["message"]
    err = error_of(post(server, path, {**base, "stop": "y" * 300}), 400)
    assert err["param"] == "stop" and "300" in err["message"]
    err = error_of(post(server, path, {**base, "stop_token_ids": list(range(65))}), 400)
    assert err["param"] == "stop_token_ids" and "64" in err["message"] and "65" in err["message"]
    # At the caps: accepted.
    at_caps = {**base, "stop": [chr(0x4E00 + i) * 256 for i in range(16)], "stop_token_ids": list(range(1, 65))}
    assert post(server, path, at_caps).status_code == 200


def test_stop_cap_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, stop=[str(i) for i in range(20)])
    assert info.value.response.json()["error"]["param"] == "stop"


# --- deadlines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 0, "5", "soon", True, [1], {"s": 1}])
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_invalid_timeout_is_400(server: LiveServer, path: str, value: Any) -> None:
    body: dict[str, Any] = {"model": BASE_MODEL, "max_tokens": 2, "timeout": value}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path == "/chat/completions" else {"prompt": "hi"}
    err = error_of(post(server, path, body), 400)
    assert err["param"] == "timeout" and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"])
def test_non_finite_timeout_is_400(server: LiveServer, literal: str) -> None:
    raw = f'{{"model": "{BASE_MODEL}", "prompt": "hi", "max_tokens": 2, "timeout": {literal}}}'
    r = httpx.post(f"{server.base_url}/completions", content=raw, headers={"content-type": "application/json"})
    assert error_of(r, 400)["param"] == "timeout"


def test_deadline_non_streamed_is_408_promptly_and_frees_everything(server: LiveServer) -> None:
    # max_retries=2: x-should-retry: false keeps the SDK from retrying the 408.
    sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=2)
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        sdk.completions.create(model=BASE_MODEL, prompt="Return the", max_tokens=1500,
                               extra_body={"ignore_eos": True, "timeout": 0.3})
    elapsed = time.monotonic() - start
    response = info.value.response
    assert response.status_code == 408 and response.headers["x-should-retry"] == "false"
    err = response.json()["error"]
    assert err["code"] == "request_timeout" and err["type"] == "timeout_error" and "0.3 s" in err["message"]
    assert 0.3 <= elapsed < 2.5, elapsed  # one attempt, stopped at its deadline
    # Chat, and several choices (each its own engine request): all aborted.
    chat = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3, "timeout": 0.3, **LONG}
    assert error_of(post(server, "/chat/completions", chat), 408)["code"] == "request_timeout"
    assert_idle(server)
    r = server.client().completions.create(model=BASE_MODEL, prompt="Return the", max_tokens=4, extra_body={"timeout": 30})
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_deadline_streamed_sends_tokens_then_an_error_event(server: LiveServer, path: str) -> None:
    body: dict[str, Any] = {"model": BASE_MODEL, "stream": True, "timeout": 0.8, "n": 2, **LONG}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path == "/chat/completions" else {"prompt": "The"}
    start = time.monotonic()
    with httpx.stream("POST", f"{server.base_url}{path}", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = read_events(r)
    assert time.monotonic() - start < 3.5
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    *chunks, error = (json.loads(e) for e in events[:-1])
    assert error["error"]["code"] == "request_timeout" and "0.8 s" in error["error"]["message"]
    assert len(chunks) > 2 and all("choices" in c for c in chunks)  # tokens came before the deadline
    assert not any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)
    assert_idle(server)


def test_deadline_stream_through_the_sdk(client: openai.OpenAI, server: LiveServer) -> None:
    stream = client.chat.completions.create(
        model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1500, stream=True,
        extra_body={"ignore_eos": True, "timeout": 0.5},
    )
    received = []
    with pytest.raises(openai.APIError, match=r"deadline of 0\.5 s"):
        for chunk in stream:
            received.append(chunk)
    assert received  # the chunks before the deadline
    assert_idle(server)
    reply = client.chat.completions.create(model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].message.content is not None


def test_server_request_timeout_applies_and_caps_the_requests_own(limits_server: LiveServer) -> None:
    async def main() -> tuple[list[str], httpx.Response, float]:
        async with httpx.AsyncClient(base_url=limits_server.base_url, timeout=30) as client:

            async def streamed() -> list[str]:
                # Asks for 60 s: the server's 3 s wins.
                async with client.stream("POST", "/completions", json=completion(8, stream=True, timeout=60, **LONG)) as r:
                    assert r.status_code == 200
                    return [line[len("data: "):] async for line in r.aiter_lines() if line.startswith("data: ")]

            async def whole() -> httpx.Response:
                await asyncio.sleep(0.2)  # second: queued behind the stream (one sequence at a time)
                return await client.post("/completions", json=completion(8, **LONG))

            start = time.monotonic()
            events, response = await asyncio.gather(streamed(), whole())
            return events, response, time.monotonic() - start

    events, response, elapsed = asyncio.run(main())
    assert SERVER_TIMEOUT <= elapsed < SERVER_TIMEOUT + 3, elapsed
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "request_timeout" and f"{SERVER_TIMEOUT:g} s" in error["message"]
    err = error_of(response, 408)  # never ran: its deadline passed in the queue
    assert err["code"] == "request_timeout"
    assert_idle(limits_server)
