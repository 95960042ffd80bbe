"""The gated delta rule's prefill (Qwen3.5's Gated DeltaNet layers) at Qwen3.5-9B shapes (32 value
heads, key and value dims 128, bf16 values, float32 state): the chunked Triton kernels against the
token-by-token one on the same prompts, and our PyTorch chunked reference, with each one's error
against the token-by-token kernel. Writes a markdown table to --out (and raw JSON beside).

    PYTHONPATH=. python bench/kernels_gated_delta.py --out bench/results/kernels-gated-delta.md

Timing: CUDA events around eager calls, median of 7 (a prefill call runs for milliseconds, so the
launches do not count; the chunked form uploads its chunk table, which a CUDA graph could not hold).
--dry-run: tiny shapes on the CPU under TRITON_INTERPRET=1, to check the script; it times nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sloth_kernels.gated_delta import gated_delta_rule_ref
from sloth_kernels.gated_delta_inputs import CHUNK
from sloth_kernels.state_batch import StateBatch

HEADS, DK, DV = 32, 128, 128
NEVER = 1 << 30  # chunked_from that keeps every sequence token by token
ROWS: list[dict] = []


def inputs(lens: list[int], heads: int, dk: int, dv: int, dev: str) -> tuple[torch.Tensor, ...]:
    t = sum(lens)
    q = torch.randn(t, heads, dk, device=dev, dtype=torch.bfloat16)
    k = torch.randn(t, heads, dk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(t, heads, dv, device=dev, dtype=torch.bfloat16)
    g = -torch.rand(t, heads, device=dev) * 0.5  # log decays of a trained model's range
    beta = torch.rand(t, heads, device=dev)
    return q, k, v, g, beta


def timed_ms(fn: Callable[[], object], dev: str, repeats: int = 7) -> float:
    if dev == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def bench(lens: list[int], heads: int, dk: int, dv: int, dev: str, with_torch: bool) -> None:
    from sloth_kernels.triton_gated_delta import gated_delta_rule_triton

    q, k, v, g, beta = inputs(lens, heads, dk, dv, dev)
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    batch = StateBatch.build(qsl, list(range(len(lens))), [False] * len(lens), torch.device(dev))
    state = torch.zeros(len(lens), heads, dk, dv, device=dev)
    shape = f"{len(lens)} x {lens[0]} tokens" if len(set(lens)) == 1 else "+".join(map(str, lens))
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "triton token by token": lambda s: gated_delta_rule_triton(q, k, v, g, beta, s, batch, chunked_from=NEVER),
        "triton chunked": lambda s: gated_delta_rule_triton(q, k, v, g, beta, s, batch),
        "triton chunked, 8 warps": lambda s: gated_delta_rule_triton(q, k, v, g, beta, s, batch, chunk_warps=8),
        # BLOCK_V 16: more programs per head, each a narrower state slice (73 KB of shared memory on sm_90)
        "triton chunked, BLOCK_V 16": lambda s: gated_delta_rule_triton(q, k, v, g, beta, s, batch,
                                                                        chunk_block_v=16),
    }
    if with_torch:
        variants["torch chunked reference"] = lambda s: gated_delta_rule_ref(q, k, v, g, beta, s, batch)
    base_state = state.clone()
    base = variants["triton token by token"](base_state)
    tokens = sum(lens)
    for name, fn in variants.items():
        row: dict = {"shape": shape, "impl": name}
        try:
            s = state.clone()
            out = fn(s)
            row["err_out"], row["err_state"] = rel_err(out, base), rel_err(s, base_state)
            ms = timed_ms(partial(fn, s), dev)  # new prompts: the state is written, never read
            row["ms"], row["tok_per_s"] = ms, tokens / ms * 1e3
        except Exception as e:  # one failing variant must not cost the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        ROWS.append(row)
        print(json.dumps(row), flush=True)


def write_markdown(path: Path, header: str) -> None:
    lines = [f"# Gated delta rule prefill ({header})", "",
             "| prompts | impl | ms | tokens/s | rel err out | rel err state |", "|---|---|---|---|---|---|"]
    for r in ROWS:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['impl']} | {r['ms']:.3f} | {r['tok_per_s']:,.0f} | {r['err_out']:.1e} "
                     f"| {r['err_state']:.1e} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks the script, times nothing")
    args = parser.parse_args()
    dev = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
        from test_attention import patch_triton_interpreter

        patch_triton_interpreter()
    import triton

    torch.manual_seed(0)
    t0 = time.time()
    gpu = "CPU dry run" if args.dry_run else torch.cuda.get_device_properties(0).name
    heads, dk, dv = (2, 16, 24) if args.dry_run else (HEADS, DK, DV)
    shapes = [[CHUNK + 5], [CHUNK + 3, 1]] if args.dry_run else [[512], [2048], [8192], [1024] * 8, [2048, *[1] * 32]]
    for lens in shapes:
        bench(lens, heads, dk, dv, dev, with_torch=sum(lens) <= 2048)
        header = (f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, {heads} heads, dk {dk}, dv {dv}, "
                  f"{time.time() - t0:.0f} s")
        write_markdown(args.out, header)
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
