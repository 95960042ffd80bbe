"""The multi-LoRA kernels alone at Llama-3-8B decode shapes: 8 rank-16 adapters, tokens round-robin,
in rank-16 slots and in the server's default rank-64 slots (each slot's rank passed, so the padding
is skipped), for each K split of the shrink and for the automatic choice. Times are per call from a
CUDA graph of back-to-back calls (what a decode step replays).

    python bench/lora_sweep.py --out bench/results/lora-sweep.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import write_json
from sloth_kernels import triton_lora
from sloth_kernels.lora import add_lora

SHAPES = {  # name: (K, output slices) of the fused projections of Llama-3-8B
    "qkv": (4096, [4096, 1024, 1024]),
    "o": (4096, [4096]),
    "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}
SPLITS = (0, 1, 2, 4, 8, 16, 32)  # 0: the automatic choice


def time_graph(fn, calls: int = 20, replays: int = 10) -> float:
    """Microseconds per call of fn, captured `calls` times in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (calls * replays)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dtype, dev = torch.bfloat16, torch.device("cuda")
    rows = []
    defaults = (triton_lora.MAX_SPLIT, triton_lora.SPLIT_PROGRAMS_PER_SM)
    for name, (k, slices) in SHAPES.items():
        n = sum(slices)
        for slot_rank in (16, 64):
            a = torch.zeros(args.adapters, len(slices) * slot_rank, k, dtype=dtype, device=dev)
            b = torch.zeros(args.adapters, n, slot_rank, dtype=dtype, device=dev)
            for i in range(len(slices)):
                a[:, i * slot_rank : i * slot_rank + 16].normal_(0, 0.02)
            b[:, :, :16].normal_(0, 0.02)
            ranks = torch.full((args.adapters,), 16, dtype=torch.int32, device=dev) if slot_rank > 16 else None
            for t in (int(v) for v in args.tokens.split(",")):
                x = torch.randn(t, k, dtype=dtype, device=dev)
                y = torch.zeros(t, n, dtype=dtype, device=dev)
                slots = torch.arange(t, dtype=torch.int32, device=dev) % args.adapters
                row = {"shape": name, "K": k, "N": n, "tokens": t, "slot_rank": slot_rank}
                for split in SPLITS:
                    triton_lora.MAX_SPLIT, triton_lora.SPLIT_PROGRAMS_PER_SM = (split, 1 << 20) if split else defaults
                    try:
                        row[f"split{split}"] = time_graph(
                            lambda x=x, y=y, slots=slots, a=a, b=b, ranks=ranks, slices=slices:
                            add_lora(y, x, a, b, slots, slices=slices, ranks=ranks))
                    except Exception as exc:  # a configuration that does not fit: noted, the sweep goes on
                        row[f"split{split}"] = float("nan")
                        print(f"!! {name} t={t} rank {slot_rank} split {split}: {type(exc).__name__}: {exc}"[:300])
                triton_lora.MAX_SPLIT, triton_lora.SPLIT_PROGRAMS_PER_SM = defaults
                row["auto_split"] = triton_lora.choose_split(k, 128, args.adapters * -(-t // min(64, max(16, t))), dev)
                rows.append(row)
                print(json.dumps(row), flush=True)
    head = "| shape | tokens | slot rank | auto (split) | " + " | ".join(f"split {s}" for s in SPLITS[1:]) + " |"
    lines = [
        f"# Multi-LoRA kernels, {args.adapters} rank-16 adapters, tokens round-robin ({torch.cuda.get_device_name()})",
        "",
        "µs per call (shrink + expand), CUDA graph of 20 calls. Rank-64 slots pass each slot's rank.",
        "",
        head,
        "|" + "---|" * (4 + len(SPLITS) - 1),
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'split{s}']:.1f}" for s in SPLITS[1:])
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['slot_rank']} | {r['split0']:.1f} ({r['auto_split']}) | {cells} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
