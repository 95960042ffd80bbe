"""Under cancellation and load: clients that time out or are killed leave nothing running and no
KV block held; a short soak at twice the batch capacity returns the server to its baseline."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
from live_server import BASE_MODEL, LiveServer

from bench.soak import soak


def wait_idle(server: LiveServer, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    health = server.health()
    while (health["num_running"] or health["num_waiting"] or health["kv_cache_usage"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        health = server.health()
    return health


def test_200_streams_timing_out_free_everything(server: LiveServer) -> None:
    async def main() -> int:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:

            async def doomed(i: int) -> str:
                body = {"model": BASE_MODEL, "prompt": f"Return the {i}", "max_tokens": 1500,
                        "ignore_eos": True, "stream": True}
                try:
                    async with asyncio.timeout(0.5):  # the client's whole-request deadline
                        async with client.stream("POST", "/completions", json=body) as r:
                            async for _ in r.aiter_lines():
                                pass
                    return "finished"
                except TimeoutError:
                    return "timeout"

            results = await asyncio.gather(*(doomed(i) for i in range(200)))
            return results.count("timeout")

    assert asyncio.run(main()) == 200
    health = wait_idle(server)
    assert health["num_running"] == 0 and health["num_waiting"] == 0 and health["kv_cache_usage"] == 0
    start = time.monotonic()
    r = server.client().completions.create(model=BASE_MODEL, prompt="Return the", max_tokens=4)
    assert r.choices[0].text is not None and time.monotonic() - start < 30


def test_killed_client_process_leaves_no_running_sequence(server: LiveServer) -> None:
    code = (
        "import httpx\n"
        f"with httpx.stream('POST', '{server.base_url}/completions', timeout=60, json={{'model': '{BASE_MODEL}', "
        "'prompt': 'The', 'max_tokens': 1800, 'ignore_eos': True, 'stream': True}) as r:\n"
        "    for line in r.iter_lines():\n"
        "        print(line, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()  # the stream has started
    deadline = time.monotonic() + 30
    while server.health()["num_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    health = wait_idle(server)
    assert health["num_running"] == 0 and health["kv_cache_usage"] == 0


def test_short_soak_returns_to_baseline(server: LiveServer) -> None:
    result = asyncio.run(soak(server.url, seconds=20, concurrency=32, model=BASE_MODEL, seed=1, pid=None))
    statuses = {k: v for k, v in result["stats"].items() if k.startswith("status_")}
    assert set(statuses) <= {"status_200"}, result["stats"]  # nothing failed but on purpose
    assert result["stats"].get("cancelled", 0) > 0
    final = result["final_health"]
    assert final["num_running"] == 0 and final["kv_cache_usage"] == 0
    assert result["probe_status"] == 200
