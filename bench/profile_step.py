"""Where one decode step's time goes on the GPU: graph replay alone vs the whole engine step, and
the engine step's host-side parts (schedule, prepare + replay launch, sampling + host copy).

    python bench/profile_step.py --random-shape llama3-8b --batch 1
    python bench/profile_step.py --batch 64 --random-loras 8   # requests spread over 8 rank-16 adapters
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.engine import random_lora, random_nf4_model
from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random-shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--random-loras", type=int, default=0, help="requests round-robin over this many adapters")
    ap.add_argument("--max-lora-rank", type=int, default=None,
                    help="the adapter slots' rank (default: the server's, here 16: no adapters named at start-up)")
    args = ap.parse_args()
    loaded = random_nf4_model(args.random_shape, torch.device("cuda"))
    engine = LLMEngine(Config(model="", device="cuda", max_model_len=1024, max_num_seqs=64,
                              max_loras=max(args.random_loras, 1), max_lora_rank=args.max_lora_rank), loaded)
    for i in range(1, args.random_loras + 1):
        engine.add_lora(i, random_lora(engine, f"lora{i}", 16, i))
    params = SamplingParams(max_tokens=4 * args.steps + 16, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), list(range(100, 164)), params, i % args.random_loras + 1 if args.random_loras else 0)
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step_ms = 1000 * (time.perf_counter() - t0) / args.steps
    graph, _ = engine.runner.graphs.graphs[(engine.runner.graphs.bucket_for(args.batch), args.random_loras > 0)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        graph.replay()
    torch.cuda.synchronize()
    replay_ms = 1000 * (time.perf_counter() - t0) / args.steps
    sched = engine.scheduler
    t0 = time.perf_counter()
    for _ in range(args.steps):
        sched.schedule()  # idempotent while nothing is postprocessed
    sched_ms = 1000 * (time.perf_counter() - t0) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"batch {args.batch}, {args.random_loras} rank-16 adapters in rank-{engine.config.max_lora_rank} slots: engine step {step_ms:.2f} ms, graph replay alone {replay_ms:.2f} ms, "
          f"schedule {sched_ms:.3f} ms")


if __name__ == "__main__":
    main()
