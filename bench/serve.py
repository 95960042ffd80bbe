"""Serving benchmark client in the manner of `vllm bench serve`, for any OpenAI-compatible server:
synthetic prompts (fixed or ShareGPT-like lengths from a seeded RNG), Poisson arrivals or a fixed
concurrency, every response streamed over SSE (httpx); reports TTFT, TPOT, inter-token latency,
end-to-end latency and throughput. Failed requests are counted and reported, never dropped.

    python bench/serve.py --base-url http://127.0.0.1:8000/v1 --endpoint completions \\
        --input-len 64 --output-len 128 --num-prompts 256 --max-concurrency 64 --json-out r.json

Exit status: 0 all requests succeeded, 1 some failed (results still printed and saved), 2 the
benchmark could not start (bad arguments, server unreachable, test request refused).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from queue import Empty
from typing import Any

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import now_iso, package_versions, summarize, synthetic_words, write_json

# Words for chat prompts: the 2-syllable ones, one token each under make_random_model's tokenizer.
CHAT_WORDS = list(islice(synthetic_words(), 100, 10100))


@dataclass(frozen=True, slots=True)
class RequestSpec:
    index: int
    model: str
    prompt: list[int] | str  # token ids (completions) or the user message (chat)
    prompt_len: int  # tokens for id prompts; words for chat (the server's usage gives its tokens)
    output_len: int


@dataclass(slots=True)
class RequestResult:
    index: int
    model: str
    expected_output: int
    ok: bool = False
    error: str = ""
    start: float = 0.0  # when it was sent, seconds after the benchmark started
    ttft: float = 0.0  # seconds to the first chunk that carries text
    e2e: float = 0.0  # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between text-carrying chunks
    prompt_tokens: int = 0
    output_tokens: int = 0  # the server's usage when it reports one, else text chunks
    num_chunks: int = 0

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# ---------------------------------------------------------------- workload


def sample_lengths(args: argparse.Namespace, rng: random.Random) -> list[tuple[int, int]]:
    """(input, output) length of each request. `random`: uniform within +-range_ratio of the
    given lengths; `sharegpt`: lognormal with the given lengths as medians (ShareGPT's long tail),
    clipped to [4, max_len] for inputs and [1, max_len] for outputs."""
    out = []
    for _ in range(args.num_prompts):
        if args.dataset == "random":
            r = args.range_ratio
            n_in = rng.randint(max(1, int(args.input_len * (1 - r))), int(args.input_len * (1 + r)))
            n_out = rng.randint(max(1, int(args.output_len * (1 - r))), int(args.output_len * (1 + r)))
        else:
            n_in = min(args.max_len, max(4, round(rng.lognormvariate(math.log(args.input_len), args.len_sigma))))
            n_out = min(args.max_len, max(1, round(rng.lognormvariate(math.log(args.output_len), args.len_sigma))))
        if args.max_model_len:
            n_in = min(n_in, args.max_model_len - 1)
            n_out = min(n_out, args.max_model_len - n_in)
        out.append((n_in, n_out))
    return out


def build_requests(args: argparse.Namespace, models: list[str]) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    specs = []
    for i, (n_in, n_out) in enumerate(sample_lengths(args, rng)):
        if args.endpoint == "completions":
            prompt: list[int] | str = [rng.randrange(args.min_token_id, args.vocab_size) for _ in range(n_in)]
        else:
            prompt = " ".join(rng.choice(CHAT_WORDS) for _ in range(n_in))
        specs.append(RequestSpec(i, models[i % len(models)], prompt, n_in, n_out))
    return specs


def send_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process at `rate` req/s
    (gamma-distributed gaps when burstiness != 1, as vLLM does), or all at once for rate inf."""
    if math.isinf(rate):
        return [0.0] * n
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


def request_body(spec: RequestSpec, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model, "max_tokens": spec.output_len, "temperature": args.temperature,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "completions":
        body["prompt"] = spec.prompt
    else:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    return {**body, **args.extra_body}


# ---------------------------------------------------------------- one streamed request


class SSEParser:
    """Splits a byte stream into the payloads of its `data:` lines (comments and other fields
    are skipped)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [line[5:].strip().decode() for line in lines if line.startswith(b"data:")]


def chunk_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or {}).get("content") or ""


def handle_event(data: str, r: RequestResult, now: float, st: float, last: float) -> float:
    """Update `r` with one SSE payload received at `now`; returns the time of the last text chunk."""
    obj = json.loads(data)
    if "error" in obj:
        err = obj["error"]
        r.error = "stream error: " + str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    if usage := obj.get("usage"):
        r.prompt_tokens = usage.get("prompt_tokens") or r.prompt_tokens
        r.output_tokens = usage.get("completion_tokens") or r.output_tokens
    for choice in obj.get("choices") or []:
        # Only chunks with text are tokens: a chat stream's role-only first chunk and a
        # finish_reason-only last chunk would otherwise shorten TTFT and ITL.
        if chunk_text(choice):
            if r.num_chunks == 0:
                r.ttft = now - st
            else:
                r.itl.append(now - last)
            r.num_chunks += 1
            last = now
    return last


async def send(client: httpx.AsyncClient, url: str, spec: RequestSpec, args: argparse.Namespace,
               t0: float) -> RequestResult:
    r = RequestResult(spec.index, spec.model, spec.output_len)
    st = last = time.perf_counter()
    r.start = st - t0
    done = False
    try:
        async with client.stream("POST", url, json=request_body(spec, args)) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {text[:300]}"
                return r
            parser = SSEParser()
            async for raw in resp.aiter_bytes():
                now = time.perf_counter()  # one timestamp per network read, as the client sees it
                for data in parser.feed(raw):
                    if data == "[DONE]":
                        done = True
                    elif data:
                        last = handle_event(data, r, now, st, last)
    except Exception as exc:  # any failure is this request's, counted in the report
        r.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        return r
    finally:
        r.e2e = time.perf_counter() - st  # failed ones too: they held a connection that long
    if not r.error and not done:
        r.error = "stream ended without data: [DONE]"
    elif not r.error and r.num_chunks == 0:
        r.error = "stream carried no text"
    if not r.prompt_tokens and isinstance(spec.prompt, list):
        r.prompt_tokens = len(spec.prompt)
    r.output_tokens = r.output_tokens or r.num_chunks
    r.ok = not r.error
    return r


# ---------------------------------------------------------------- the run


def metrics(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    ms = 1000.0
    events = sorted([(r.start, 1) for r in results] + [(r.start + r.e2e, -1) for r in results])
    peak = running = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok).most_common(10)),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_concurrent_requests": peak,
        # With ignore_eos every request should stop at max_tokens; a server that ignores it shows here.
        "output_len_mismatches": sum(1 for r in ok if r.output_tokens != r.expected_output),
        "ttft_ms": summarize([r.ttft * ms for r in ok], percentiles),
        "tpot_ms": summarize([r.tpot * ms for r in ok if r.tpot is not None], percentiles),
        "itl_ms": summarize([x * ms for r in ok for x in r.itl], percentiles),
        "e2e_ms": summarize([r.e2e * ms for r in ok], percentiles),
        "requests_by_model": dict(Counter(r.model for r in results)),
    }


class SetupError(Exception):
    """The benchmark cannot start: the message says what to fix."""


def make_client(args: argparse.Namespace) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # no client-side queue
    return httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(args.timeout, connect=30.0))


def endpoint_url(args: argparse.Namespace) -> str:
    return f"{args.base_url}/{'completions' if args.endpoint == 'completions' else 'chat/completions'}"


async def prepare(args: argparse.Namespace) -> tuple[str, list[RequestSpec]]:
    """The served model's name and the requests; one short test request per model name first, so a
    typo or a stopped server fails here rather than as a third of the run."""
    url = endpoint_url(args)
    async with make_client(args) as client:
        deadline = time.monotonic() + args.ready_timeout
        while True:
            try:
                resp = await client.get(f"{args.base_url}/models")
                resp.raise_for_status()
                model = args.model or resp.json()["data"][0]["id"]
                break
            except (httpx.HTTPError, OSError, KeyError, IndexError, ValueError) as exc:
                if time.monotonic() < deadline:
                    await asyncio.sleep(1.0)  # the server is still loading its model
                    continue
                raise SetupError(f"cannot list models at {args.base_url}/models ({exc}); is the server up? "
                                 "--ready-timeout waits for one that is starting") from exc
        models = args.lora_names or [model]
        specs = build_requests(args, models)
        if not args.skip_test_request:
            for name in dict.fromkeys(models):
                probe = RequestSpec(-1, name, specs[0].prompt, specs[0].prompt_len, min(4, specs[0].output_len))
                r = await send(client, url, probe, args, time.perf_counter())
                if not r.ok:
                    raise SetupError(f"test request to {url} with model {name!r} failed: {r.error}")
    return model, specs


async def run_shard(args: argparse.Namespace, specs: list[RequestSpec], times: list[float],
                    max_concurrency: int | None, on_done: Callable[[], Any],
                    ready: Callable[[], Any] = lambda: None) -> tuple[list[RequestResult], float, float]:
    """Send `specs` at `times` (seconds after the start), at most `max_concurrency` at once.
    Returns the results, the wall time, and the CPU seconds this process spent."""
    url = endpoint_url(args)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with make_client(args) as client:

        async def one(spec: RequestSpec, at: float) -> RequestResult:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                r = await send(client, url, spec, args, t0)
            else:
                async with sem:
                    r = await send(client, url, spec, args, t0)
            on_done()
            return r

        ready()  # the other worker processes start together
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(one(s, at) for s, at in zip(specs, times, strict=True)))
        return list(results), time.perf_counter() - t0, time.process_time() - cpu0


def worker_main(args: argparse.Namespace, specs: list[RequestSpec], times: list[float], max_concurrency: int | None,
                barrier: Any, queue: Any) -> None:
    """One client process of --num-workers: ticks the queue per request, then puts its results."""
    out = asyncio.run(run_shard(args, specs, times, max_concurrency, lambda: queue.put(None),
                                lambda: barrier.wait(timeout=120)))
    queue.put(out)


def run_workers(args: argparse.Namespace, specs: list[RequestSpec], times: list[float],
                bar: tqdm) -> tuple[list[RequestResult], float, float]:
    """Request i goes to worker i % n, and each worker gets its share of --max-concurrency, so one
    Python process's SSE parsing does not cap (and delay) what a fast server streams."""
    n = args.num_workers
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = []
    for w in range(n):
        conc = None if not args.max_concurrency else args.max_concurrency // n + (w < args.max_concurrency % n)
        procs.append(ctx.Process(target=worker_main, daemon=True,
                                 args=(args, specs[w::n], times[w::n], conc, barrier, queue)))
        procs[-1].start()
    shards: list[tuple[list[RequestResult], float, float]] = []
    while len(shards) < n:
        try:
            item = queue.get(timeout=1.0)
        except Empty:
            if dead := [p.exitcode for p in procs if p.exitcode not in (None, 0)]:
                raise SetupError(f"a client worker process died (exit codes {dead})") from None
            continue
        if item is None:
            bar.update(1)
        else:
            shards.append(item)
    for p in procs:
        p.join()
    results = sorted((r for shard in shards for r in shard[0]), key=lambda r: r.index)
    return results, max(s[1] for s in shards), max(s[2] for s in shards)


def benchmark(args: argparse.Namespace) -> tuple[dict[str, Any], list[RequestResult]]:
    """Raises SetupError when the server cannot be used; otherwise returns metrics and results."""
    model, specs = asyncio.run(prepare(args))
    times = send_times(len(specs), args.request_rate, args.burstiness, random.Random(args.seed + 1))
    bar = tqdm(total=len(specs), disable=args.disable_tqdm, desc="requests", unit="req")
    if args.num_workers > 1:
        results, duration, cpu = run_workers(args, specs, times, bar)
    else:
        results, duration, cpu = asyncio.run(run_shard(args, specs, times, args.max_concurrency, lambda: bar.update(1)))
    bar.close()
    m = metrics(results, duration, args.percentiles)
    m["model"] = model
    m["client_cpu_percent"] = 100.0 * cpu / duration  # of one core, the busiest client process
    return m, results


# ---------------------------------------------------------------- report and CLI


def report(m: dict[str, Any], args: argparse.Namespace) -> str:
    def row(label: str, value: Any) -> str:
        v = f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{label:<40}{v:>12}"

    lines = [f"{' Serving Benchmark Result ':=^52}",
             row("Successful requests:", m["completed"]), row("Failed requests:", m["failed"]),
             row("Request rate configured (req/s):", args.request_rate),
             row("Max concurrency configured:", args.max_concurrency or "none"),
             row("Peak concurrent requests:", m["max_concurrent_requests"]),
             row("Benchmark duration (s):", m["duration_s"]),
             row("Total input tokens:", m["total_input_tokens"]),
             row("Total generated tokens:", m["total_output_tokens"]),
             row("Request throughput (req/s):", m["request_throughput"]),
             row("Output token throughput (tok/s):", m["output_throughput"]),
             row("Total token throughput (tok/s):", m["total_token_throughput"])]
    names = {"ttft_ms": ("Time to First Token", "TTFT"), "tpot_ms": ("Time per Output Token (excl. 1st token)", "TPOT"),
             "itl_ms": ("Inter-token Latency", "ITL"), "e2e_ms": ("End-to-end Latency", "E2EL")}
    for key, (title, short) in names.items():
        lines.append(f"{title:-^52}")
        lines.append(row(f"Mean {short} (ms):", m[key]["mean"]))
        for q in args.percentiles:
            lines.append(row(f"{'Median' if q == 50 else f'P{q:g}'} {short} (ms):", m[key][f"p{q:g}"]))
    lines.append("=" * 52)
    if m["output_len_mismatches"]:
        lines.append(f"warning: {m['output_len_mismatches']} responses did not have max_tokens tokens "
                     "(does the server honour ignore_eos?)")
    if m["client_cpu_percent"] > 80:
        lines.append(f"warning: the client used {m['client_cpu_percent']:.0f}% of a core: it may be the "
                     "bottleneck, and latencies include its queueing")
    for err, n in m["errors"].items():
        lines.append(f"error x{n}: {err}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the first id of GET /models")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="completions sends token-id prompts (exact input length); chat sends random words")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random",
                   help="random: fixed lengths (+-range-ratio); sharegpt: lognormal lengths around the medians")
    p.add_argument("--input-len", type=int, default=None, help="default 512 (random) / median 160 (sharegpt)")
    p.add_argument("--output-len", type=int, default=None, help="default 128 (random) / median 180 (sharegpt)")
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--len-sigma", type=float, default=1.0, help="sharegpt: sigma of log-length")
    p.add_argument("--max-len", type=int, default=2048, help="sharegpt: clip of each length")
    p.add_argument("--max-model-len", type=int, default=None, help="clip input + output to this")
    p.add_argument("--vocab-size", type=int, default=4096, help="completions: prompt ids drawn below this")
    p.add_argument("--min-token-id", type=int, default=10, help="completions: and at or above this")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s, Poisson (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--num-workers", type=int, default=None,
                   help="client processes (requests and concurrency split between them); default: one per 16 "
                        "concurrent requests, 1 to 4 (one process used 75-83%% of a core at 64 streams and "
                        "~5,000 tok/s on the H100, near being the bottleneck)")
    p.add_argument("--lora-names", default=None, help="comma list of model names (adapters) used round-robin")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (servers that reject it); output lengths then vary")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into each request")
    p.add_argument("--percentiles", default="50,99", help="comma list, e.g. 50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--ready-timeout", type=float, default=0.0,
                   help="seconds to wait for GET /models to answer (a server still loading)")
    p.add_argument("--skip-test-request", action="store_true")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--save-requests", action="store_true", help="also save every request's timings in --json-out")
    p.add_argument("--label", default=None, help="free text saved with the results")
    args = p.parse_args(argv)
    defaults = (512, 128) if args.dataset == "random" else (160, 180)
    args.input_len = args.input_len or defaults[0]
    args.output_len = args.output_len or defaults[1]
    args.base_url = args.base_url.rstrip("/")
    args.lora_names = [n.strip() for n in args.lora_names.split(",") if n.strip()] if args.lora_names else None
    args.percentiles = [float(q) for q in args.percentiles.split(",")]
    if args.input_len < 1 or args.output_len < 1 or args.num_prompts < 1:
        p.error("--input-len, --output-len and --num-prompts must be at least 1")
    if args.request_rate <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        p.error("--request-rate must be > 0 and --max-concurrency >= 1")
    if args.num_workers is None:
        args.num_workers = max(1, min(4, (args.max_concurrency or 1) // 16, args.num_prompts))
    if args.num_workers < 1 or (args.max_concurrency and args.max_concurrency < args.num_workers):
        p.error("--num-workers must be >= 1 and at most --max-concurrency")
    if not isinstance(args.extra_body, dict):
        p.error("--extra-body must be a JSON object")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        m, results = benchmark(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(report(m, args))
    if args.json_out:
        config = {**vars(args), "api_key": "***" if args.api_key else None, "request_rate": str(args.request_rate)}
        out = {"date": now_iso(), "label": args.label, "config": config, "metrics": m,
               "versions": package_versions("httpx")}
        if args.save_requests:
            out["requests"] = [asdict(r) for r in results]
        write_json(args.json_out, out)
        print(f"results written to {args.json_out}", file=sys.stderr)
    return 0 if m["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
