"""A bounded soak on loopback: mixed streaming and non-streaming requests, some cancelled at random,
at about twice the engine's batch capacity; afterwards the server's KV usage and running requests
must return to zero and its memory to near the baseline.

    python bench/soak.py --base-url http://127.0.0.1:8000 --seconds 180 --concurrency 128 --out soak.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def one_request(client: httpx.AsyncClient, rng: random.Random, model: str, stats: dict[str, int]) -> None:
    stream = rng.random() < 0.6
    cancel_after = rng.uniform(0.05, 1.0) if rng.random() < 0.3 else None
    body = {"model": model, "prompt": "Return the " * rng.randint(1, 40), "max_tokens": rng.randint(1, 64),
            "temperature": rng.choice([0.0, 0.8]), "stream": stream, "ignore_eos": rng.random() < 0.5}
    try:
        async with asyncio.timeout(cancel_after if cancel_after is not None else 300):
            if stream:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
                    stats[f"status_{r.status_code}"] = stats.get(f"status_{r.status_code}", 0) + 1
            else:
                r = await client.post("/v1/completions", json=body)
                stats[f"status_{r.status_code}"] = stats.get(f"status_{r.status_code}", 0) + 1
    except TimeoutError:
        stats["cancelled"] = stats.get("cancelled", 0) + 1
    except httpx.HTTPError as exc:
        stats[f"transport_{type(exc).__name__}"] = stats.get(f"transport_{type(exc).__name__}", 0) + 1


async def soak(base_url: str, seconds: float, concurrency: int, model: str, seed: int, pid: int | None) -> dict:
    rng = random.Random(seed)
    stats: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        baseline = (await client.get("/health")).json()
        rss0 = rss_bytes(pid)
        deadline = time.monotonic() + seconds
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() < deadline:
                sent += 1
                await one_request(client, rng, model, stats)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        settle = time.monotonic() + 30
        health = (await client.get("/health")).json()
        while (health.get("num_running") or health.get("kv_cache_usage")) and time.monotonic() < settle:
            await asyncio.sleep(0.2)
            health = (await client.get("/health")).json()
        rss1 = rss_bytes(pid)
        probe_start = time.monotonic()
        probe = await client.post("/v1/completions", json={"model": model, "prompt": "Return the", "max_tokens": 4})
        return {"sent": sent, "stats": stats, "baseline_health": baseline, "final_health": health,
                "rss_before": rss0, "rss_after": rss1, "probe_status": probe.status_code,
                "probe_seconds": time.monotonic() - probe_start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="base")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-pid", type=int, default=None, help="to read its resident memory from /proc")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = asyncio.run(soak(args.base_url, args.seconds, args.concurrency, args.model, args.seed, args.server_pid))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
