"""NF4 linear and multi-LoRA kernels at Llama-3-8B shapes, beside their peers in the same run.

    python bench/kernels_nf4.py --out results.md [--json raw.json] [--sweep] [--quick]

Each implementation is timed as a CUDA graph of back-to-back calls (eager if it cannot be captured),
cycling over enough weight copies that they do not fit in L2, with CUDA events; a row reports the
median over replays. GB/s counts the bytes a call must read (NF4 codes + 8-bit absmax + nested
statistics for NF4, the weight for bf16); TFLOP/s counts 2*M*N*K. Peers: bitsandbytes
`matmul_4bit` (its GEMV for one row), Unsloth `fast_gemv` (one row) and `fast_dequantize` + matmul,
torch bf16 `F.linear` (cuBLAS), and a device-to-device copy for the bandwidth ceiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sloth_kernels import triton_nf4
from sloth_kernels.lora import add_lora
from sloth_kernels.nf4 import dequantize_nf4_ref, nf4_linear, quantize_nf4_ref
from sloth_kernels.nf4_format import NF4Weight

SHAPES = {"o 4096x4096": (4096, 4096), "down 4096x14336": (4096, 14336), "gate/up 14336x4096": (14336, 4096),
          "qkv 6144x4096": (6144, 4096)}
# Separately quantized k and v (checkpoints quantize each projection on its own): only --sweep-batch swept.
KV_SHAPE = {"k/v 1024x4096": (1024, 4096)}
ROWS = [1, 8, 16, 64, 512, 2048]
L2_ROTATE_BYTES = 320 << 20  # weights cycled per graph: several times the H200's 60 MB L2
DTYPE = torch.bfloat16


def copies_for(nbytes: int) -> int:
    return max(2, min(64, math.ceil(L2_ROTATE_BYTES / nbytes)))


def time_calls(fns: list[Callable[[], object]], replays: int = 15, min_calls: int = 24) -> tuple[float, str]:
    """Median µs per call over `replays` timings of a CUDA graph running every fn in turn (repeated
    to at least min_calls); eager when the graph cannot be captured."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    loops = max(1, math.ceil(min_calls / len(fns)))
    calls = loops * len(fns)
    method = "graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(loops):
                for f in fns:
                    f()
        run: Callable[[], object] = graph.replay
    except Exception:
        torch.cuda.synchronize()
        method = "eager"

        def run() -> None:
            for _ in range(loops):
                for f in fns:
                    f()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times), method


def copy_bandwidth() -> float:
    src = torch.randn(512 << 20, device="cuda")  # 2 GiB of fp32
    dst = torch.empty_like(src)
    for _ in range(5):  # let the clocks come up
        dst.copy_(src)
    us, _ = time_calls([lambda: dst.copy_(src)], replays=10, min_calls=8)
    return 2 * src.numel() * 4 / us / 1e3  # GB/s, read + write


class Case:
    """One weight shape: NF4 copies (ours, bitsandbytes' QuantState view of the same bytes) and
    bf16 copies, built on the GPU with random values."""

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        base = quantize_nf4_ref(torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02)
        self.nf4_bytes = base.nbytes
        self.weights = [base] + [
            dataclasses.replace(base, data=base.data.clone(), absmax=base.absmax.clone())
            for _ in range(copies_for(base.nbytes) - 1)
        ]
        self.bnb = [w.to_bnb() for w in self.weights]
        dense = torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02
        self.dense = [dense] + [dense.clone() for _ in range(copies_for(dense.numel() * 2) - 1)]

    def gb_s(self, us: float) -> float:
        return self.nf4_bytes / us / 1e3

    def tflops(self, m: int, us: float) -> float:
        return 2 * m * self.n * self.k / us / 1e6


def peers(case: Case, x: torch.Tensor) -> dict[str, Callable[[NF4Weight | int], object]]:
    """name -> fn(copy index) for each available peer."""
    m = x.shape[0]
    found: dict[str, Callable] = {}
    try:
        import bitsandbytes as bnb

        def bnb_fn(i: int) -> object:
            data, state = case.bnb[i]
            return bnb.matmul_4bit(x, data.t(), quant_state=state)

        found["bitsandbytes matmul_4bit" + (" (gemv)" if m == 1 else "")] = bnb_fn
    except Exception as exc:
        print(f"bitsandbytes unavailable: {exc}")
    try:
        from unsloth.kernels.utils import fast_dequantize, fast_gemv

        if m == 1:
            x3 = x.view(1, 1, -1)
            found["Unsloth fast_gemv"] = lambda i: fast_gemv(x3, case.bnb[i][0], case.bnb[i][1])
        found["Unsloth fast_dequantize + matmul"] = lambda i: torch.matmul(
            x, fast_dequantize(case.bnb[i][0], case.bnb[i][1]).t())
    except Exception as exc:
        print(f"unsloth unavailable: {exc}")
    return found


def bench_shape(name: str, case: Case, rows: list[int], results: list[dict]) -> None:
    for m in rows:
        x = torch.randn(m, case.k, device="cuda", dtype=DTYPE)
        impls: dict[str, tuple[Callable[[int], object], int]] = {
            "sloth-serve nf4_linear": (lambda i, x=x: nf4_linear(x, case.weights[i]), len(case.weights)),
        }
        for peer, fn in peers(case, x).items():
            impls[peer] = (fn, len(case.weights))
        impls["torch bf16 F.linear (cuBLAS)"] = (lambda i, x=x: F.linear(x, case.dense[i]), len(case.dense))
        exact = x.double() @ dequantize_nf4_ref(dataclasses.replace(case.weights[0], dtype=torch.float32)).double().T
        ours = nf4_linear(x, case.weights[0]).double()
        check = {"shape": name, "rows": m, "check": "nf4_linear vs float64",
                 "rel_err": ((ours - exact).norm() / exact.norm()).item()}
        results.append(check)
        print(json.dumps(check), flush=True)
        for impl, (fn, count) in impls.items():
            row = {"shape": name, "rows": m, "impl": impl}
            try:
                us, method = time_calls([lambda i=i, fn=fn: fn(i) for i in range(count)])
                nbytes = case.dense[0].numel() * 2 if "bf16" in impl else case.nf4_bytes
                row.update(us=us, method=method, gb_s=nbytes / us / 1e3, tflops=case.tflops(m, us))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                traceback.print_exc()
                torch.cuda.synchronize()
            results.append(row)
            print(json.dumps(row), flush=True)


G = triton_nf4.GemvConfig
GEMV_SWEEP = [  # tl.dot (matrix unit) GEMV, then the CUDA-core one (one row only)
    G(block_n=64, kb=2, num_warps=4, num_stages=3, waves=4),
    G(block_n=64, kb=2, num_warps=4, num_stages=4, waves=4),
    G(block_n=64, kb=1, num_warps=4, num_stages=4, waves=4),
    G(block_n=64, kb=1, num_warps=4, num_stages=5, waves=8),
    G(block_n=64, kb=2, num_warps=4, num_stages=3, waves=8),
    G(block_n=128, kb=1, num_warps=4, num_stages=4, waves=4),
]
FMA_SWEEP = [
    G(block_n=64, kb=2, num_warps=4, waves=4, cuda_cores=True),
    G(block_n=64, kb=2, num_warps=4, waves=8, cuda_cores=True),
    G(block_n=128, kb=2, num_warps=4, waves=4, cuda_cores=True),
    G(block_n=32, kb=2, num_warps=2, waves=8, cuda_cores=True),
    G(block_n=64, kb=4, num_warps=4, waves=4, cuda_cores=True),
]
# A decode batch (rows 17..64): wider column tiles and fewer K splits (each split writes an fp32
# [N, 64] partial that the last program sums), 4 or 8 warps.
BATCH_SWEEP = [G(block_n=bn, kb=kb, num_warps=w, num_stages=st, waves=wv)
               for bn, w in ((64, 4), (128, 4), (128, 8), (256, 8)) for kb, st in ((1, 4), (2, 3)) for wv in (1, 2, 4)]
C = triton_nf4.GemmConfig
GEMM_SWEEP = [
    C(block_m=256, block_n=128, num_warps=8, num_stages=3),
    C(block_m=256, block_n=128, num_warps=8, num_stages=4),
    C(block_m=128, block_n=256, num_warps=8, num_stages=4),
    C(block_m=128, block_n=128, num_warps=4, num_stages=4),
    C(block_m=128, block_n=128, num_warps=8, num_stages=3),
]


def sweep_plan(batch_only: bool = False) -> list[tuple[str, int, str, list]]:
    """(shape, rows, kind, configs): one row on every shape, more rows on down and gate/up; with
    batch_only, 64 rows on every shape of a decoder layer (BATCH_SWEEP)."""
    if batch_only:
        return [(name, 64, "gemv", BATCH_SWEEP) for name in {**SHAPES, **KV_SHAPE}]
    plan = [(name, 1, "gemv", GEMV_SWEEP + FMA_SWEEP) for name in SHAPES]
    for name in ("down 4096x14336", "gate/up 14336x4096"):
        plan += [(name, 16, "gemv", GEMV_SWEEP), (name, 64, "gemv", GEMV_SWEEP[:5]),
                 (name, 2048, "gemm", GEMM_SWEEP), (name, 512, "gemm", GEMM_SWEEP)]
    return plan


def sweep(cases: dict[str, Case], results: list[dict], batch_only: bool = False) -> None:
    """Time each configuration (checking its output), then register the fastest per shape and row
    bucket in triton_nf4.TUNED, so the table that follows runs what the defaults will be."""
    best: dict[tuple[int, int, int], tuple[float, object]] = {}
    for name, m, kind, configs in sweep_plan(batch_only):
        case = cases[name]
        x = torch.randn(m, case.k, device="cuda", dtype=DTYPE)
        exact = x.double() @ dequantize_nf4_ref(dataclasses.replace(case.weights[0], dtype=torch.float32)).double().T
        for cfg in configs:
            kw = {kind: cfg}
            row = {"sweep": kind, "shape": name, "rows": m, "config": dataclasses.asdict(cfg)}
            try:
                err = ((triton_nf4.nf4_matmul(x, case.weights[0], **kw).double() - exact).norm() / exact.norm()).item()
                us, _ = time_calls([lambda w=w, x=x, kw=kw: triton_nf4.nf4_matmul(x, w, **kw) for w in case.weights],
                                   replays=9)
                row.update(us=us, gb_s=case.gb_s(us), tflops=case.tflops(m, us), rel_err=err)
                key = (case.n, case.k, triton_nf4.bucket(m))
                chooses = kind == "gemv" or m == 2048  # the prefill choice is made at 2048 rows
                if chooses and err < 1e-2 and (key not in best or us < best[key][0]):
                    best[key] = (us, cfg)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                torch.cuda.synchronize()
            results.append(row)
            print(json.dumps(row), flush=True)
    for (n, k, bucket), (_, cfg) in best.items():
        triton_nf4.TUNED[(n, k, bucket)] = cfg
    # Shapes swept at one row only take the row-16/64/prefill choices of the swept shape with their K.
    for n, k in SHAPES.values():
        donor = next(((dn, dk) for dn, dk in [SHAPES["gate/up 14336x4096"], SHAPES["down 4096x14336"]] if dk == k), None)
        for bucket in (16, 64, 2048):
            if (n, k, bucket) not in triton_nf4.TUNED and donor and (*donor, bucket) in triton_nf4.TUNED:
                triton_nf4.TUNED[(n, k, bucket)] = triton_nf4.TUNED[(*donor, bucket)]
    chosen = {f"{n}x{k} rows<={b}": dataclasses.asdict(c) for (n, k, b), c in sorted(triton_nf4.TUNED.items())}
    results.append({"tuned": chosen})
    print(json.dumps({"tuned": chosen}), flush=True)


def bench_lora(cases: dict[str, Case], results: list[dict], rank: int = 16, adapters: int = 8) -> None:
    """The gate/up projection alone vs with 8 rank-16 adapters, tokens assigned round-robin."""
    name = "gate/up 14336x4096"
    case = cases[name]
    sets = [(torch.randn(adapters, rank, case.k, device="cuda", dtype=DTYPE) * 0.02,
             torch.randn(adapters, case.n, rank, device="cuda", dtype=DTYPE) * 0.02) for _ in case.weights]
    for m in (1, 8, 64):
        x = torch.randn(m, case.k, device="cuda", dtype=DTYPE)
        slots = (torch.arange(m, device="cuda", dtype=torch.int32) % adapters)

        def with_lora(i: int, x: torch.Tensor = x, slots: torch.Tensor = slots) -> object:
            y = nf4_linear(x, case.weights[i])
            return add_lora(y, x, sets[i][0], sets[i][1], slots)

        base_us, _ = time_calls([lambda i=i, x=x: nf4_linear(x, case.weights[i]) for i in range(len(case.weights))])
        lora_us, method = time_calls([lambda i=i: with_lora(i) for i in range(len(case.weights))])
        a_bytes = min(m, adapters) * rank * (case.k + case.n) * 2
        row = {"lora": True, "shape": name, "rows": m, "adapters_used": min(m, adapters), "base_us": base_us,
               "with_lora_us": lora_us, "overhead_pct": 100 * (lora_us / base_us - 1), "lora_bytes": a_bytes,
               "byte_floor_pct": 100 * a_bytes / case.nf4_bytes, "method": method}
        results.append(row)
        print(json.dumps(row), flush=True)


def _compile_one(task: tuple[int, int, int, str, dict]) -> str:
    """Worker: one call of the kernel configuration, so Triton's disk cache holds its binary."""
    n, k, m, kind, cfg = task
    try:
        w = quantize_nf4_ref(torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02)
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        config = triton_nf4.GemvConfig(**cfg) if kind == "gemv" else triton_nf4.GemmConfig(**cfg)
        triton_nf4.nf4_matmul(x, w, **{kind: config})
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:
        return f"{task}: {type(exc).__name__}: {str(exc)[:200]}"


def precompile(shapes: dict[str, tuple[int, int]], rows: list[int], with_sweep: bool, workers: int,
               batch_only: bool = False) -> None:
    """Compile every configuration the run will time in parallel processes first (Triton compiles
    one kernel at a time per process; the timed process then loads them from the disk cache)."""
    tasks = set()
    for n, k in shapes.values():
        for m in rows:
            kind = "gemv" if m <= triton_nf4.GEMV_MAX_ROWS else "gemm"
            cfg = triton_nf4.gemv_config_for(m, n, k) if kind == "gemv" else triton_nf4.gemm_config_for(m, n, k)
            tasks.add((n, k, m if m > 16 else 1, kind, json.dumps(dataclasses.asdict(cfg))))
    if with_sweep:
        for name, m, kind, configs in sweep_plan(batch_only):
            n, k = {**SHAPES, **KV_SHAPE}[name]
            tasks.update((n, k, m, kind, json.dumps(dataclasses.asdict(c))) for c in configs)
    if with_sweep and not batch_only:
        for n, k in (SHAPES["o 4096x4096"], SHAPES["qkv 6144x4096"]):  # they inherit gate/up's choices
            for m, configs, kind in ((16, GEMV_SWEEP, "gemv"), (64, GEMV_SWEEP[:5], "gemv"), (2048, GEMM_SWEEP, "gemm")):
                tasks.update((n, k, m, kind, json.dumps(dataclasses.asdict(c))) for c in configs)
    def same_binary(task: tuple[int, int, int, str, str]) -> tuple[int, int, int, str, str]:
        n, k, m, kind, c = task  # row counts that compile to the same kernel collapse to one job
        if kind == "gemm":
            return n, k, 2048, kind, c
        return n, k, m if json.loads(c)["cuda_cores"] else (16 if m <= 16 else 64), kind, c

    jobs = [(n, k, m, kind, json.loads(c)) for n, k, m, kind, c in sorted({same_binary(t) for t in tasks})]
    started = time.time()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = [r for r in pool.map(_compile_one, jobs) if r != "ok"]
    print(f"precompiled {len(jobs)} configurations in {time.time() - started:.0f} s; failed: {failed}", flush=True)


def markdown(env: dict, results: list[dict]) -> str:
    lines = ["# NF4 linear kernels: sloth-serve vs peers", "", *[f"- {k}: {v}" for k, v in env.items()], ""]
    lines += ["| shape (out x in) | rows | implementation | µs | GB/s | TFLOP/s | timing |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        if "impl" not in r:
            continue
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['rows']} | {r['impl']} | error: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['shape']} | {r['rows']} | {r['impl']} | {r['us']:.1f} | {r['gb_s']:.0f} | "
                         f"{r['tflops']:.1f} | {r['method']} |")
    checks = [r for r in results if "check" in r]
    if checks:
        worst = max(r["rel_err"] for r in checks)
        lines += ["", f"Correctness: largest ‖nf4_linear − exact‖/‖exact‖ over the rows above: {worst:.2e} "
                      "(bf16 output; exact = float64 on the fp32 NF4 weight)."]
    lora = [r for r in results if r.get("lora")]
    if lora:
        lines += ["", "| LoRA (8 adapters, rank 16, gate/up) rows | base µs | with LoRA µs | overhead | "
                      "adapter bytes / NF4 bytes |", "|---|---|---|---|---|"]
        lines += [f"| {r['rows']} | {r['base_us']:.1f} | {r['with_lora_us']:.1f} | {r['overhead_pct']:.1f}% | "
                  f"{r['byte_floor_pct']:.1f}% |" for r in lora]
    sweeps = [r for r in results if "sweep" in r]
    if sweeps:
        lines += ["", "| sweep | shape | rows | config | µs | GB/s | TFLOP/s | rel. error |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sweeps:
            cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
            lines.append(f"| {r['sweep']} | {r['shape']} | {r['rows']} | {cfg} | "
                         + (f"{r['us']:.1f} | {r['gb_s']:.0f} | {r['tflops']:.1f} | {r['rel_err']:.1e} |" if "us" in r
                            else f"error: {r['error'][:80]} | | | |"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="markdown table to write")
    parser.add_argument("--json", help="raw rows to write as JSON")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel configurations")
    parser.add_argument("--quick", action="store_true", help="two shapes, rows 1 and 2048")
    parser.add_argument("--sweep-batch", action="store_true",
                        help="sweep BATCH_SWEEP at 64 rows on every layer shape (k/v too), then time 64 rows only")
    parser.add_argument("--precompile", type=int, default=0, help="compile first in this many processes")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    env = {"date": time.strftime("%Y-%m-%d"), "gpu": f"{props.name}, {props.multi_processor_count} SMs",
           "torch": torch.__version__, "command": " ".join(sys.argv)}
    for mod in ("triton", "bitsandbytes", "unsloth"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:
            env[mod] = f"unavailable ({type(exc).__name__})"
    env["copy bandwidth (read+write)"] = f"{copy_bandwidth():.0f} GB/s"
    results: list[dict] = []
    shapes = dict(list(SHAPES.items())[1:3]) if args.quick else {**SHAPES, **KV_SHAPE} if args.sweep_batch else SHAPES
    rows = [1, 2048] if args.quick else [64] if args.sweep_batch else ROWS
    if args.precompile:
        precompile(shapes, rows, args.sweep or args.sweep_batch, args.precompile, args.sweep_batch)
    cases = {name: Case(n, k) for name, (n, k) in shapes.items()}
    started = time.time()

    def save() -> None:  # after every section, so a run cut short still leaves its rows
        env["bench wall time"] = f"{time.time() - started:.0f} s"
        Path(args.out).write_text(markdown(env, results))
        if args.json:
            Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=1))

    if args.sweep or args.sweep_batch:
        sweep(cases, results, args.sweep_batch)
        save()
    for name, case in cases.items():
        bench_shape(name, case, rows, results)
        save()
    if "gate/up 14336x4096" in cases and not args.sweep_batch:
        bench_lora(cases, results)
        save()
    print(markdown(env, [r for r in results if "sweep" not in r]))


if __name__ == "__main__":
    main()
