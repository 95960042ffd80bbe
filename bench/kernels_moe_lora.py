"""Expert LoRA on one MoE layer at Qwen3-30B-A3B's shape (128 experts, hidden 2048, expert width 768,
top-8, bf16; 4 adapter slots of rank 16): the grouped Triton path (the base launches plus one shrink
and one expand per projection) against the same launches without LoRA and against the expert-by-
expert reference with LoRA (what steps holding such an adapter ran before, eagerly). Every token
uses an adapter, or half of them do. Writes a markdown table to --out (and raw JSON beside).

    PYTHONPATH=. python bench/kernels_moe_lora.py --out bench/results/kernels-moe-lora.md

Timing: CUDA events, median of 7; the grouped calls replayed from a CUDA graph (as decode runs
them), the reference eagerly (it synchronizes with the host, no graph can hold it).
--dry-run: tiny shapes on the CPU under TRITON_INTERPRET=1, to check the script; it times nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sloth_kernels.moe import moe_experts, moe_experts_lora_ref, route, silu_and_mul
from sloth_kernels.moe_lora import ExpertLoRA, MoELoRA

FULL = dict(experts=128, hidden=2048, inter=768, top_k=8, rank=16, slots=4, tokens=[1, 8, 32, 64, 256, 1024])
DRY = dict(experts=8, hidden=64, inter=32, top_k=2, rank=4, slots=2, tokens=[1, 5])


def tables(slots: int, experts: int, rank: int, dim_in: int, dim_out: int, dev: str) -> ExpertLoRA:
    a = torch.randn(slots, experts, rank, dim_in, device=dev, dtype=torch.bfloat16) / dim_in**0.5
    b = torch.randn(slots, experts, dim_out, rank, device=dev, dtype=torch.bfloat16) / rank**0.5
    return ExpertLoRA(a, b, torch.full((slots,), rank, dtype=torch.int32, device=dev))


def timed_ms(fn: Callable[[], object], dev: str, graph: bool, repeats: int = 7) -> float:
    if dev == "cpu":
        fn()
        return float("nan")
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(t: int, w13: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor, gate_up: ExpertLoRA,
            down: ExpertLoRA, shape: dict, dev: str) -> dict[str, float]:
    """One batch of t tokens: the base launches, with every token's / half the tokens' LoRA, and the
    expert-by-expert reference with every token's."""
    x = torch.randn(t, w13.shape[2], device=dev, dtype=torch.bfloat16)
    ids, weights = route(x, gate, shape["top_k"], True, False)
    slots = torch.arange(t, device=dev, dtype=torch.int32) % shape["slots"]
    every = MoELoRA(slots, gate_up, down)
    half = MoELoRA(torch.where(torch.arange(t, device=dev) % 2 == 0, slots, -1).int(), gate_up, down)

    def project(e: int, proj: str, rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(rows, (w13 if proj == "gate_up" else w2)[e])

    return {"tokens": t,
            "base_ms": timed_ms(lambda: moe_experts(x, ids, weights, w13, w2), dev, True),
            "lora_all_ms": timed_ms(lambda: moe_experts(x, ids, weights, w13, w2, lora=every), dev, True),
            "lora_half_ms": timed_ms(lambda: moe_experts(x, ids, weights, w13, w2, lora=half), dev, True),
            "reference_ms": timed_ms(lambda: moe_experts_lora_ref(x, ids, weights, w13.shape[0], project,
                                                                  silu_and_mul, every), dev, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels-moe-lora.md"))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    shape, dev = (DRY, "cpu") if args.dry_run else (FULL, "cuda")
    if args.dry_run:
        from sloth_kernels.triton_interp import patch_interpreter

        patch_interpreter()
    e, h, i, r, s = (shape[n] for n in ("experts", "hidden", "inter", "rank", "slots"))
    torch.manual_seed(0)
    w13 = torch.randn(e, 2 * i, h, device=dev, dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, i, device=dev, dtype=torch.bfloat16) / i**0.5
    gate = torch.randn(e, h, device=dev, dtype=torch.bfloat16)
    gate_up, down = tables(s, e, r, h, 2 * i, dev), tables(s, e, r, i, h, dev)
    rows = []
    for t in shape["tokens"]:
        rows.append(measure(t, w13, w2, gate, gate_up, down, shape, dev))
        print(json.dumps(rows[-1]), flush=True)
    if args.dry_run:
        return
    lines = ["| tokens | base (ms) | + LoRA, every token (ms) | + LoRA, half (ms) | expert by expert + LoRA (ms) |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {w['tokens']} | {w['base_ms']:.3f} | {w['lora_all_ms']:.3f} | {w['lora_half_ms']:.3f} | "
              f"{w['reference_ms']:.3f} |" for w in rows]
    args.out.write_text(__doc__.split("\n\n")[0] + "\n\n" + "\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"shape": shape, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
