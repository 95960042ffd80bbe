"""Time the two samplers on the GPU: the PyTorch reference (sloth_kernels.sampling.sample_ref: a sort for
top-k / top-p) and the Triton kernel (sloth_kernels.triton_sampling: bisection, no sort), at Llama-3's
vocabulary (128,256) and 1, 8 and 64 rows, for the parameter mixes a server sees.

    python bench/sampler.py [--out FILE.md]

Each figure is the median of triton.testing.do_bench (CUDA events, L2 flushed between calls); the
noise q is drawn once outside the timed call, as the engine draws it before sampling.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sloth_kernels.sampling import sample_ref
from sloth_kernels.triton_sampling import sample_triton

VOCAB = 128256
MIXES = {  # name -> (top_k, top_p, min_p) for every row
    "temperature only": (VOCAB, 1.0, 0.0),
    "top_p 0.9": (VOCAB, 0.9, 0.0),
    "top_k 50 + top_p 0.9": (50, 0.9, 0.0),
    "min_p 0.05": (VOCAB, 1.0, 0.05),
}


def main() -> None:
    import triton.testing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    lines = [
        f"# Sampler timing, {datetime.date.today()}, {torch.cuda.get_device_name()}",
        "",
        f"Command: `python bench/sampler.py --rows {args.rows}`; vocabulary {VOCAB}, fp32 logits (randn * 4).",
        "",
        "| rows | mix | torch sort (µs) | triton bisection (µs) | same tokens |",
        "|---|---|---|---|---|",
    ]
    for rows in (int(r) for r in args.rows.split(",")):
        torch.manual_seed(rows)
        logits = torch.randn(rows, VOCAB, device=dev) * 4
        q = torch.empty_like(logits).exponential_()
        temp = torch.full((rows,), 0.8, device=dev)
        for name, (k, p, mp) in MIXES.items():
            top_k = torch.full((rows,), k, device=dev, dtype=torch.int32)
            top_p = torch.full((rows,), p, device=dev)
            min_p = torch.full((rows,), mp, device=dev)
            args = (logits, temp, top_k, top_p, min_p, q)
            flags = (k < VOCAB or p < 1, mp > 0)  # given from the host, as the engine does
            ref = functools.partial(sample_ref, *args, *flags)
            tri = functools.partial(sample_triton, *args)
            same = torch.equal(ref(), tri())
            t_ref = triton.testing.do_bench(ref, warmup=25, rep=200, return_mode="median") * 1e3
            t_tri = triton.testing.do_bench(tri, warmup=25, rep=200, return_mode="median") * 1e3
            lines.append(f"| {rows} | {name} | {t_ref:.1f} | {t_tri:.1f} | {same} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
