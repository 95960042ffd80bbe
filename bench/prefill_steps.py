"""Prompt steps on the GPU, engine alone (issue 23 parts 3 and 4), on a random-weight model:

1. time to first token of a lone prompt (64 and 512 tokens by default), prompt steps replayed from
   CUDA graphs against eager ones (wall of the step and its device time);
2. greedy tokens of replayed prompt steps against eager ones (prompts alone, together, beside decodes);
3. inter-token latency of decoding streams while long prompts arrive, for each bound on the prompt
   tokens of a step beside decodes (--max-prefill-tokens-while-decoding), with the prompt tok/s.

    python bench/prefill_steps.py --shape llama3-8b --out results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.engine import random_nf4_model
from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def first_token_ms(engine: LLMEngine, prompt: list[int]) -> tuple[float, float | None]:
    """Wall from add_request to the first token, and the device time of the step that sampled it."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.add_request(f"ttft-{random.random()}", prompt, GREEDY)
    device = None
    while engine.has_unfinished_requests:
        engine.step()
        device = engine.runner.last_forward_seconds
    return 1000 * (time.perf_counter() - start), None if device is None else 1000 * device


def ttft(engine: LLMEngine, lens: list[int], repeats: int, rng: random.Random, vocab: int) -> dict:
    graphs = engine.runner.prefill_graphs
    out: dict = {}
    for mode in ("graphs", "eager"):
        engine.runner.prefill_graphs = graphs if mode == "graphs" else None
        for n in lens:
            runs = [first_token_ms(engine, [rng.randrange(vocab) for _ in range(n)]) for _ in range(repeats + 2)][2:]
            walls = [w for w, _ in runs]
            devs = [d for _, d in runs if d is not None]
            out[f"{mode} {n}"] = {"ttft_ms_median": statistics.median(walls), "ttft_ms_min": min(walls),
                                  "device_ms_median": statistics.median(devs) if devs else None}
            print(mode, n, out[f"{mode} {n}"], flush=True)
    engine.runner.prefill_graphs = graphs
    return out


def greedy(engine: LLMEngine, rng: random.Random, vocab: int) -> dict:
    """The same staggered requests with prompt steps replayed and eager: tokens per request."""
    reqs = [(rng.randrange(0, 30), [rng.randrange(vocab) for _ in range(n)], rng.randrange(4, 16))
            for n in (5, 16, 40, 64, 100, 200, 300, 512, 700, 9, 33)]
    graphs = engine.runner.prefill_graphs
    results = {}
    for mode in ("graphs", "eager"):
        engine.runner.prefill_graphs = graphs if mode == "graphs" else None
        before = graphs.num_replays if graphs is not None else 0
        got: dict[str, list[int]] = {}
        pending = sorted(enumerate(reqs), key=lambda r: r[1][0])
        step = 0
        while pending or engine.has_unfinished_requests:
            while pending and pending[0][1][0] <= step:
                i, (_, prompt, m) = pending.pop(0)
                engine.add_request(f"g{i}", prompt, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
                got[f"g{i}"] = []
            for o in engine.step():
                got[o.request_id].extend(o.new_token_ids)
            step += 1
        results[mode] = got
        if graphs is not None and mode == "graphs":
            results["replays"] = graphs.num_replays - before
    engine.runner.prefill_graphs = graphs
    same = sum(results["graphs"][k] == results["eager"][k] for k in results["eager"])
    first = sum(results["graphs"][k][0] == results["eager"][k][0] for k in results["eager"])
    return {"requests": len(reqs), "identical": same, "first_token_identical": first,
            "prefill_replays": results.get("replays")}


def streams(engine: LLMEngine, bound: int, rng: random.Random, vocab: int, num_streams: int, prompt_len: int,
            seconds: float) -> dict:
    """num_streams requests of prompt_len tokens, arriving one after another while the earlier ones
    decode: the gaps between each stream's tokens (decode steps and those shared with prompt chunks)."""
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, max_prefill_tokens_while_decoding=bound)
    times: dict[str, list[float]] = {}
    start = time.perf_counter()
    every = 0.15  # a new long prompt this often (s)
    added = 0
    prompt_done: dict[str, float] = {}
    while time.perf_counter() - start < seconds:
        if len(prompt_done) == num_streams and time.perf_counter() - max(prompt_done.values()) > 0.5:
            break  # every prompt done, and the streams decoded alone a while
        if added < num_streams and time.perf_counter() - start >= added * every:
            rid = f"s{bound}-{added}"
            engine.add_request(rid, [rng.randrange(vocab) for _ in range(prompt_len)],
                               SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True))
            times[rid] = []
            added += 1
        for o in engine.step():
            now = time.perf_counter()
            times[o.request_id].append(now)
            prompt_done.setdefault(o.request_id, now)
    for rid in list(times):
        engine.abort(rid)
    while engine.has_unfinished_requests:
        engine.step()
    gaps = sorted(b - a for t in times.values() for a, b in itertools.pairwise(t))
    span = max(prompt_done.values()) - start if prompt_done else float("nan")

    def pct(p: float) -> float:
        return 1000 * gaps[min(len(gaps) - 1, int(p * len(gaps)))] if gaps else float("nan")
    res = {"bound": bound, "itl_p50_ms": pct(0.5), "itl_p99_ms": pct(0.99), "itl_max_ms": pct(1.0),
           "gaps": len(gaps), "prompts_done": len(prompt_done),
           "prompt_tok_s": len(prompt_done) * prompt_len / span if prompt_done else None}
    print(res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--lens", default="64,512")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--bounds", default="auto,2048", help="prompt tokens beside decodes; auto: the engine's default")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=3000)
    ap.add_argument("--stream-seconds", type=float, default=12.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    loaded = random_nf4_model(args.shape, torch.device("cuda"))
    engine = LLMEngine(Config(model="", device="cuda", max_model_len=4096, max_num_seqs=64,
                              enable_prefix_caching=False), loaded)
    print(f"engine ready in {time.perf_counter() - t0:.1f}s", flush=True)
    rng = random.Random(0)
    vocab = loaded.model.config.vocab_size
    result: dict = {"shape": args.shape, "ttft": ttft(engine, [int(n) for n in args.lens.split(",")], args.repeats,
                                                      rng, vocab)}
    result["greedy"] = greedy(engine, rng, vocab)
    print(result["greedy"], flush=True)
    auto = engine.scheduler.config.max_prefill_tokens_while_decoding
    result["streams"] = [streams(engine, auto if b == "auto" else int(b), rng, vocab, args.streams, args.prompt_len,
                                 args.stream_seconds) for b in args.bounds.split(",")]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
