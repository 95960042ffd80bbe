"""Where an eager (not graph-captured) step's host time goes: prefill steps of a given prompt length
on a random-weight model, timed, then one of them under cProfile (top functions by own time).

    python bench/profile_eager.py --random-shape llama3-8b --prompt-lens 1,64,512
    python bench/profile_eager.py --model DIR      # a folder loaded the server's way (through Unsloth)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.engine import random_nf4_model
from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams


def prefill_step(engine: LLMEngine, n: int, rng: random.Random, tag: str) -> float:
    """Wall time of the engine step that prefills one fresh n-token prompt (no prefix-cache hit)."""
    engine.add_request(tag, [rng.randrange(100, 120000) for _ in range(n)], SamplingParams(max_tokens=1, temperature=0))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests:
        engine.step()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random-shape", default="llama3-8b")
    ap.add_argument("--model", default=None, help="load this folder through Unsloth instead")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--prompt-lens", default="1,64,512")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    loaded = None if args.model else random_nf4_model(args.random_shape, torch.device("cuda"))
    engine = LLMEngine(Config(model=args.model or "", device="cuda", max_model_len=4096, max_num_seqs=64), loaded)
    rng = random.Random(0)
    for n in [int(x) for x in args.prompt_lens.split(",")]:
        for i in range(2):
            prefill_step(engine, n, rng, f"warm-{n}-{i}")
        times = sorted(prefill_step(engine, n, rng, f"t-{n}-{i}") for i in range(args.repeats))
        print(f"prefill {n} tokens: median {times[len(times) // 2]:.2f} ms (min {times[0]:.2f})", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as gpu_prof:
            prefill_step(engine, n, rng, f"g-{n}")
        kernels = [e for e in gpu_prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 1000
        print(f"prefill {n} tokens: {len(kernels)} GPU kernels, {gpu_ms:.2f} ms of GPU time", flush=True)
        print(gpu_prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
        if not args.profile:
            continue
        prof = cProfile.Profile()
        prof.enable()
        prefill_step(engine, n, rng, f"p-{n}")
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
        print(s.getvalue()[-6000:], flush=True)


if __name__ == "__main__":
    main()
