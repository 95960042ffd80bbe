"""The CUDA NF4 GEMV (sloth_kernels.cuda_nf4) against the Triton GEMV and cuBLAS on bf16, in one run.

    python bench/kernels_nf4_cuda.py --out results.md [--json raw.json] [--precompile 14] [--no-sweep]

Checks first (a failure is reported, the timing still runs): one-hot rows, whose products are single
weights, must reproduce the reference dequantization bit for bit; random rows are compared with
float64; a CUDA graph of the call must replay to the eager result. Timing as bench/kernels_nf4.py (a
CUDA graph of back-to-back calls over > 320 MB of weight copies, median of replays). The sweep times
each launch shape (strips per CTA x warps) and reports the default's choice beside the best one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels_nf4 import SHAPES, Case, precompile, time_calls
from sloth_kernels import cuda_nf4, triton_nf4
from sloth_kernels.nf4 import dequantize_nf4_ref, nf4_linear

ROWS = [1, 8, 16, 32, 64]
DTYPE = torch.bfloat16


def checks(case: Case, name: str, results: list[dict]) -> None:
    w = case.weights[0]
    deq = dequantize_nf4_ref(w).to(DTYPE)  # the reference's values, in the compute dtype
    for m in ROWS:
        row: dict = {"check": "correctness", "shape": name, "rows": m}
        try:
            cols = torch.randint(0, case.k, (m,), device="cuda")
            onehot = torch.zeros(m, case.k, device="cuda", dtype=DTYPE)
            onehot[torch.arange(m), cols] = 1
            got = cuda_nf4.nf4_gemv(onehot, w)
            row["onehot_mismatches"] = int((got.view(torch.int16) != deq[:, cols].T.view(torch.int16)).sum())
            x = torch.randn(m, case.k, device="cuda", dtype=DTYPE)
            exact = x.double() @ deq.double().T
            ours = cuda_nf4.nf4_gemv(x, w).double()
            row["rel_err"] = ((ours - exact).norm() / exact.norm()).item()
            tri = triton_nf4.nf4_matmul(x, w).double()
            row["triton_rel_err"] = ((tri - exact).norm() / exact.norm()).item()
            ulp = (ours.to(DTYPE).view(torch.int16).int() - exact.to(DTYPE).view(torch.int16).int()).abs()
            row["max_ulp_vs_rounded_exact"] = int(ulp.max())
            row["deterministic"] = bool(torch.equal(cuda_nf4.nf4_gemv(x, w), cuda_nf4.nf4_gemv(x, w)))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            traceback.print_exc()
        results.append(row)
        print(json.dumps(row), flush=True)


def graph_check(case: Case, results: list[dict]) -> None:
    """nf4_linear (which takes the CUDA kernel here) captured in a CUDA graph replays to eager."""
    row: dict = {"check": "cuda graph capture", "shape": f"{case.n}x{case.k}"}
    try:
        x = torch.randn(4, case.k, device="cuda", dtype=DTYPE)
        eager = nf4_linear(x, case.weights[0])
        static = torch.empty_like(eager)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph):
            nf4_linear(x, case.weights[0], out=static)
        torch.cuda.current_stream().wait_stream(side)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        row["equal"] = bool(torch.equal(static, eager))
        row["cuda_kernel_enabled"] = cuda_nf4.enabled()
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        traceback.print_exc()
    results.append(row)
    print(json.dumps(row), flush=True)


def sweep_configs(m: int) -> list[cuda_nf4.CudaGemvConfig]:
    """Launch shapes (rs, K-split warps, row warps) worth timing for m rows."""
    c = cuda_nf4.CudaGemvConfig
    if cuda_nf4.n_tiles(m) == 1:
        out = [c(1, 4), c(1, 8), c(1, 16), c(2, 8), c(1, 8, 2), c(1, 4, 2), c(1, 4, 4)]
        out += [c(1, 4, 1, 1), c(1, 8, 1, 1), c(1, 4, 2, 1), c(2, 4, 1, 1), c(1, 2, 4, 1)]
    else:
        out = [c(1, 16), c(1, 8, 2), c(1, 4, 4), c(1, 2, 8), c(1, 1, 16), c(1, 4, 2), c(1, 2, 4), c(1, 2, 2)]
        out += [c(1, 8, 1, 1), c(1, 4, 2, 1), c(1, 2, 4, 1)]
        if cuda_nf4.n_tiles(m) == 2:
            out += [c(2, 4, 2), c(2, 2, 4), c(2, 4, 1, 1)]
    tiles = cuda_nf4.n_tiles(m)
    return [cfg for cfg in out if cuda_nf4.smem_bytes(cfg, tiles) <= cuda_nf4.SMEM_LIMIT]


def label(cfg: cuda_nf4.CudaGemvConfig) -> str:
    return f"rs={cfg.rs} warps={cfg.warps}x{cfg.row_warps} decode={cfg.decode}"


def timing(case: Case, name: str, sweep: bool, results: list[dict]) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in ROWS:
        x = torch.randn(m, case.k, device="cuda", dtype=DTYPE)
        default = cuda_nf4.config_for(m, case.n, case.k, sms)
        impls: dict[str, tuple] = {
            f"cuda nf4_gemv (default {label(default)})": (
                lambda i, x=x: cuda_nf4.nf4_gemv(x, case.weights[i]),
                case.weights,
                case.nf4_bytes,
            ),
            "triton nf4_matmul": (
                lambda i, x=x: triton_nf4.nf4_matmul(x, case.weights[i]),
                case.weights,
                case.nf4_bytes,
            ),
            "torch bf16 F.linear (cuBLAS)": (
                lambda i, x=x: F.linear(x, case.dense[i]),
                case.dense,
                case.dense[0].numel() * 2,
            ),
        }
        if sweep:
            for cfg in sweep_configs(m):
                if cfg != default:
                    impls[f"cuda sweep {label(cfg)}"] = (
                        lambda i, x=x, cfg=cfg: cuda_nf4.nf4_gemv(x, case.weights[i], config=cfg),
                        case.weights,
                        case.nf4_bytes,
                    )
        for impl, (fn, copies, nbytes) in impls.items():
            row: dict = {"shape": name, "rows": m, "impl": impl}
            try:
                us, method = time_calls([lambda i=i, fn=fn: fn(i) for i in range(len(copies))], replays=11)
                row.update(us=us, method=method, gb_s=nbytes / us / 1e3)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc()
                torch.cuda.synchronize()
            results.append(row)
            print(json.dumps(row), flush=True)


def fastest(results: list[dict]) -> dict[str, str]:
    """The quickest CUDA launch shape per (shape, rows), to fill cuda_nf4.TUNED from."""
    best: dict[str, tuple[float, str]] = {}
    for r in results:
        if r.get("impl", "").startswith("cuda") and "us" in r:
            key = f"{r['shape']} rows={r['rows']}"
            if key not in best or r["us"] < best[key][0]:
                best[key] = (r["us"], r["impl"])
    return {key: f"{impl} {us:.1f} us" for key, (us, impl) in best.items()}


def markdown(env: dict, results: list[dict]) -> str:
    lines = ["## The run", ""] + [f"- {k}: {v}" for k, v in env.items()] + [""]
    lines += ["| check | shape | rows | result |", "|---|---|---|---|"]
    for r in results:
        if "check" in r:
            rest = {k: v for k, v in r.items() if k not in ("check", "shape", "rows")}
            lines.append(
                f"| {r['check']} | {r.get('shape', '')} | {r.get('rows', '')} | {json.dumps(rest)} |"
            )
    lines += [
        "",
        "| shape | rows | implementation | µs | GB/s | % of cuBLAS bf16 read rate |",
        "|---|---|---|---|---|---|",
    ]
    cublas = {
        (r["shape"], r["rows"]): r["gb_s"]
        for r in results
        if r.get("impl", "").startswith("torch bf16") and "gb_s" in r
    }
    for r in results:
        if "impl" not in r:
            continue
        if "us" not in r:
            lines.append(
                f"| {r['shape']} | {r['rows']} | {r['impl']} | error: {r.get('error', '')[:120]} | | |"
            )
            continue
        ref = cublas.get((r["shape"], r["rows"]))
        pct = f"{100 * r['gb_s'] / ref:.0f}%" if ref else ""
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r['impl']} | {r['us']:.1f} | {r['gb_s']:.0f} | {pct} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--json")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument(
        "--precompile", type=int, default=0, help="Triton kernels compiled first in N processes"
    )
    args = parser.parse_args()
    started = time.time()
    if args.precompile:
        precompile(SHAPES, ROWS, False, args.precompile)
    props = torch.cuda.get_device_properties(0)
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": f"{props.name}, {props.multi_processor_count} SMs",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
    results: list[dict] = []

    def save() -> None:
        Path(args.out).write_text(markdown(env, results))
        if args.json:
            Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=1))

    cases = {name: Case(n, k) for name, (n, k) in SHAPES.items()}
    t0 = time.time()
    cuda_nf4.nf4_gemv(torch.randn(1, 4096, device="cuda", dtype=DTYPE), cases["o 4096x4096"].weights[0])
    torch.cuda.synchronize()
    env["first compile + call (s)"] = round(time.time() - t0, 2)
    for name, case in cases.items():
        checks(case, name, results)
    graph_check(cases["down 4096x14336"], results)
    save()
    for name, case in cases.items():
        timing(case, name, not args.no_sweep, results)
        save()
    env["wall (s)"] = round(time.time() - started)
    env["fastest launch per (shape, rows)"] = fastest(results)
    save()
    print(f"done in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
