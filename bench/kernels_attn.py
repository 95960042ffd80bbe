"""Attention, RMSNorm, RoPE and KV-write kernels at Llama-3-8B shapes (32 q heads, 8 kv heads, head_dim
128, hidden 4096, bf16) beside their peers in the same run: torch SDPA (flash / cuDNN / efficient) on
contiguous K/V, torch eager RMSNorm and RoPE. Writes a markdown table to --out (and raw JSON beside).

    PYTHONPATH=. python bench/kernels_attn.py --out bench/results/kernels-attn.md

Timing (see the device tool's METHOD.md): each op is captured many times in one CUDA graph, over
input sets rotated so that their bytes exceed the 60 MB L2 several times; the median of 10 replays
over calls per replay is the time of one call. 'eager' is the same loop launched from Python.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sloth_kernels.attention import AttnMetadata, paged_attention
from sloth_kernels.norm import add_rms_norm, add_rms_norm_ref
from sloth_kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin, rope_inv_freq
from sloth_kernels.triton_attention import paged_attention_triton, write_kv_triton

HQ, HK, D, HIDDEN, DT = 32, 8, 128, 4096, torch.bfloat16
ROTATE_BYTES = 400 << 20
DEV = "cuda"
Fn = Callable[[], object]
ROWS: list[dict] = []


def sets_for(bytes_per_set: int, cap: int = 64) -> int:
    return max(1, min(cap, math.ceil(ROTATE_BYTES / max(bytes_per_set, 1))))


def wall_us(fns: list[Fn]) -> float:
    """--dry-run on the CPU: checks the code paths, times nothing worth reporting."""
    t = time.perf_counter()
    for fn in fns:
        fn()
    return (time.perf_counter() - t) * 1e6 / len(fns)


def graph_us(fns: list[Fn], min_calls: int = 40, replays: int = 10) -> float:
    """Median µs of one call, from replays of a CUDA graph holding every fn (several times)."""
    if DEV == "cpu":
        return wall_us(fns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    reps = max(1, math.ceil(min_calls / len(fns)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for fn in fns:
                fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(fns)))
    del graph
    return statistics.median(times)


def eager_us(fns: list[Fn], min_calls: int = 40, repeats: int = 7) -> float:
    if DEV == "cpu":
        return wall_us(fns)
    for fn in fns[:2]:
        fn()
    torch.cuda.synchronize()
    reps = max(1, math.ceil(min_calls / len(fns)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(reps):
            for fn in fns:
                fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(fns)))
    return statistics.median(times)


def record(section: str, shape: str, impl: str, fns: list[Fn], gbytes: float = 0.0, tflop: float = 0.0,
           eager: bool = False) -> float | None:
    """Times one implementation; gbytes / tflop are per call, for GB/s or TFLOP/s."""
    row: dict = {"section": section, "shape": shape, "impl": impl}
    try:
        us = graph_us(fns)
        row["us"] = us
        if eager:
            row["eager_us"] = eager_us(fns)
        row["rate"] = f"{gbytes / us * 1e6:,.0f} GB/s" if gbytes else f"{tflop / us * 1e6:,.0f} TFLOP/s"
    except Exception as e:  # keep going: one failing variant must not cost the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        us = None
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return us


def ceilings(scale: int) -> None:
    a = torch.randn(1 << 28 >> scale, device=DEV)  # 1 GiB
    b = torch.empty_like(a)
    record("ceiling", "copy 1 GiB", "torch copy_", [lambda: b.copy_(a)], gbytes=2 * a.numel() * 4 / 1e9)
    n = 8192 >> scale
    m = [torch.randn(n, n, device=DEV, dtype=DT) for _ in range(3)]
    record("ceiling", f"matmul {n}^3 bf16", "torch.mm", [lambda: m[0] @ m[1], lambda: m[1] @ m[2]],
           tflop=2 * n**3 / 1e12)


def paged_sets(q_lens: list[int], seq_lens: list[int], n_sets: int, block_size: int = 16):
    """n_sets batches over disjoint, randomly placed blocks of one shared cache."""
    per_seq = [math.ceil(s / block_size) for s in seq_lens]
    per_set = sum(per_seq)
    shape = (n_sets * per_set, block_size, HK, D)
    k_cache = torch.randn(shape, device=DEV, dtype=DT)
    v_cache = torch.randn(shape, device=DEV, dtype=DT)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    sets = []
    for s in range(n_sets):
        perm = (s * per_set + torch.randperm(per_set)).int()
        tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
        used = 0
        for b, n in enumerate(per_seq):
            tables[b, :n] = perm[used : used + n]
            used += n
        meta = AttnMetadata(
            slot_mapping=torch.zeros(starts[-1], dtype=torch.long, device=DEV), block_tables=tables.to(DEV),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEV), seq_lens_host=list(seq_lens),
            query_start_loc_host=starts, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        )
        sets.append((torch.randn(starts[-1], HQ, D, device=DEV, dtype=DT), meta))
    return k_cache, v_cache, sets


def ours(k_cache, v_cache, sets, **tiles) -> list[Fn]:
    scale = D**-0.5
    if not tiles:  # the public entry point, as the model calls it
        return [lambda q=q, m=m: paged_attention(q, k_cache, v_cache, m, scale) for q, m in sets]
    return [lambda q=q, m=m: paged_attention_triton(q, k_cache, v_cache, m.block_tables, m.seq_lens, m.query_start_loc,
                                                    m.max_query_len, scale, None, m.num_decodes, **tiles)
            for q, m in sets]


def sdpa_peers(section: str, shape: str, q_len: int, kv_len: int, batch: int, n_sets: int, causal: bool,
               gbytes: float = 0.0, tflop: float = 0.0) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs = [torch.randn(batch, HQ, q_len, D, device=DEV, dtype=DT) for _ in range(n_sets)]
    ks = [torch.randn(batch, HK, kv_len, D, device=DEV, dtype=DT) for _ in range(n_sets)]
    vs = [torch.randn(batch, HK, kv_len, D, device=DEV, dtype=DT) for _ in range(n_sets)]
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        def call(i: int, backend=backend) -> object:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qs[i], ks[i], vs[i], is_causal=causal, enable_gqa=True)
        record(section, shape, f"SDPA {name} (GQA, contiguous K/V)", [lambda i=i: call(i) for i in range(n_sets)],
               gbytes, tflop)
    # K/V repeated to 32 heads beforehand (the repeat is not timed): 4x the bytes, any backend
    ks = [k.repeat_interleave(HQ // HK, dim=1) for k in ks]
    vs = [v.repeat_interleave(HQ // HK, dim=1) for v in vs]
    record(section, shape, "SDPA default (K/V repeated to 32 heads)",
           [lambda i=i: F.scaled_dot_product_attention(qs[i], ks[i], vs[i], is_causal=causal) for i in range(n_sets)],
           gbytes, tflop)


DECODE_VARIANTS = [{}, {"block_n": 32}, {"block_n": 64}, {"block_n": 128}, {"programs_per_sm": 8},
                   {"num_splits": 1}]
PREFILL_VARIANTS = [{}, {"block_n": 64}, {"num_stages": 2}, {"block_m": 64}]


def bench_decode(batch: int, ctx: int) -> None:
    kv_bytes = batch * ctx * HK * D * 2 * 2
    n_sets = sets_for(kv_bytes)
    shape = f"decode B={batch} ctx={ctx}"
    k_cache, v_cache, sets = paged_sets([1] * batch, [ctx] * batch, n_sets)
    for tiles in DECODE_VARIANTS:
        name = "ours (paged, bs16)" + (f" {tiles}" if tiles else " default")
        record("decode", shape, name, ours(k_cache, v_cache, sets, **tiles), gbytes=kv_bytes / 1e9, eager=not tiles)
    del k_cache, v_cache, sets
    sdpa_peers("decode", shape, 1, ctx, batch, n_sets, False, gbytes=kv_bytes / 1e9)


def bench_prefill(tokens: int) -> None:
    tflop = 4 * HQ * D * tokens * (tokens + 1) / 2 / 1e12  # causal: half the score matrix
    n_sets = sets_for(tokens * (HQ + 2 * HK) * D * 2)
    shape = f"prefill {tokens} tokens (causal)"
    k_cache, v_cache, sets = paged_sets([tokens], [tokens], n_sets)
    for tiles in PREFILL_VARIANTS:
        name = "ours (paged, bs16)" + (f" {tiles}" if tiles else " default")
        record("prefill", shape, name, ours(k_cache, v_cache, sets, **tiles), tflop=tflop, eager=not tiles)
    del k_cache, v_cache, sets
    sdpa_peers("prefill", shape, tokens, tokens, 1, n_sets, True, tflop=tflop)


def bench_mixed(decodes: int, ctx: int, chunk: int) -> None:
    """Decodes + one prompt chunk over as many cached tokens: one kernel for all vs two kernels."""
    q_lens, seq_lens = [1] * decodes + [chunk], [ctx] * decodes + [3 * chunk]
    k_cache, v_cache, sets = paged_sets(q_lens, seq_lens, 2)
    shape = f"mixed: {decodes} decode @{ctx} + chunk {chunk} @{3 * chunk}"
    kv_bytes = sum(seq_lens) * HK * D * 4
    record("mixed", shape, "ours, prefill kernel for all", ours(k_cache, v_cache, sets), gbytes=kv_bytes / 1e9)
    for _, m in sets:
        m.num_decodes = decodes
    record("mixed", shape, f"ours, num_decodes={decodes} (two kernels)", ours(k_cache, v_cache, sets), gbytes=kv_bytes / 1e9)


def bench_norm(tokens: int) -> None:
    n_sets = sets_for(tokens * HIDDEN * 2 * 4)
    xs = [torch.randn(tokens, HIDDEN, device=DEV, dtype=DT) for _ in range(n_sets)]
    rs = [torch.randn(tokens, HIDDEN, device=DEV, dtype=DT) for _ in range(n_sets)]
    w = (1 + 0.1 * torch.randn(HIDDEN, device=DEV)).to(DT)
    gb = (4 * tokens * HIDDEN * 2 + HIDDEN * 2) / 1e9  # read x, residual; write out, sum
    shape = f"add+RMSNorm T={tokens}"
    record("rmsnorm", shape, "ours (fused)", [lambda i=i: add_rms_norm(xs[i], rs[i], w, 1e-5) for i in range(n_sets)],
           gbytes=gb, eager=True)
    record("rmsnorm", shape, "torch eager (reference)",
           [lambda i=i: add_rms_norm_ref(xs[i], rs[i], w, 1e-5) for i in range(n_sets)], gbytes=gb)
    record("rmsnorm", shape, "torch eager F.rms_norm(x + r)",
           [lambda i=i: F.rms_norm(xs[i] + rs[i], (HIDDEN,), w, 1e-5) for i in range(n_sets)], gbytes=gb)


def bench_rope(tokens: int) -> None:
    cos, sin = (t.to(DEV) for t in rope_cos_sin(rope_inv_freq(D, 500000.0), 8192))
    n_sets = sets_for(tokens * (HQ + HK) * D * 2 * 2)
    qkvs = [torch.randn(tokens, (HQ + 2 * HK) * D, device=DEV, dtype=DT) for _ in range(n_sets)]
    views = [(x[:, : HQ * D].view(tokens, HQ, D), x[:, HQ * D : (HQ + HK) * D].view(tokens, HK, D)) for x in qkvs]
    pos = [torch.randint(0, 8192, (tokens,), device=DEV) for _ in range(n_sets)]
    gb = (2 * tokens * (HQ + HK) * D * 2 + tokens * D * 4) / 1e9  # q, k read + written; cos/sin rows
    shape = f"RoPE q+k T={tokens}"
    record("rope", shape, "ours (in place)",
           [lambda i=i: apply_rope(*views[i], pos[i], cos, sin) for i in range(n_sets)], gbytes=gb, eager=True)
    record("rope", shape, "torch eager (reference)",
           [lambda i=i: apply_rope_ref(*views[i], pos[i], cos, sin) for i in range(n_sets)], gbytes=gb)


def bench_write_kv(tokens: int) -> None:
    n_sets = sets_for(tokens * HK * D * 2 * 4)
    cache_k = torch.randn(4096, 16, HK, D, device=DEV, dtype=DT)
    cache_v = torch.randn_like(cache_k)
    kvs = [torch.randn(tokens, 2, HK, D, device=DEV, dtype=DT) for _ in range(n_sets)]
    slots = [torch.randperm(4096 * 16, device=DEV)[:tokens] for _ in range(n_sets)]
    gb = tokens * HK * D * 2 * 4 / 1e9

    def peer(i: int) -> None:
        cache_k.view(-1, HK, D)[slots[i]] = kvs[i][:, 0]
        cache_v.view(-1, HK, D)[slots[i]] = kvs[i][:, 1]

    shape = f"write_kv T={tokens}"
    record("write_kv", shape, "ours", [lambda i=i: write_kv_triton(kvs[i][:, 0], kvs[i][:, 1], cache_k, cache_v, slots[i])
                                       for i in range(n_sets)], gbytes=gb, eager=True)
    record("write_kv", shape, "torch index_put", [lambda i=i: peer(i) for i in range(n_sets)], gbytes=gb)


def write_markdown(path: Path, header: str) -> None:
    lines = [header, "", "| section | shape | implementation | µs (graph) | µs (eager) | rate |", "|---|---|---|---|---|---|"]
    for r in ROWS:
        us = f"{r['us']:.1f}" if "us" in r else r.get("error", "")
        eager = f"{r['eager_us']:.1f}" if "eager_us" in r else ""
        lines.append(f"| {r['section']} | {r['shape']} | {r['impl']} | {us} | {eager} | {r.get('rate', '')} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks the script, times nothing")
    args = parser.parse_args()
    global DEV, ROTATE_BYTES
    dry = args.dry_run
    if dry:
        DEV, ROTATE_BYTES = "cpu", 1
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
        from test_attention import patch_triton_interpreter

        patch_triton_interpreter()
    import triton

    torch.manual_seed(0)
    t0 = time.time()
    gpu = "CPU dry run" if dry else torch.cuda.get_device_properties(0).name

    def save() -> None:  # after every section, so that a run cut short still leaves its rows
        header = f"GPU: {gpu}, torch {torch.__version__}, triton {triton.__version__}, bf16, {time.time() - t0:.0f} s"
        write_markdown(args.out, header)
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": ROWS}, indent=1))

    ceilings(6 if dry else 0)
    for batch in (1, 2) if dry else (1, 8, 64):
        for ctx in (40, 70) if dry else (512, 2048, 8192):
            bench_decode(batch, ctx)
            save()
    for tokens in (24,) if dry else (512, 2048):
        bench_prefill(tokens)
        save()
    for tokens in (1, 5) if dry else (1, 64, 2048):
        bench_norm(tokens)
        bench_rope(tokens)
    for tokens in (7,) if dry else (64, 2048):
        bench_write_kv(tokens)
    save()
    bench_mixed(*((3, 40, 8) if dry else (63, 2048, 512)))
    save()


if __name__ == "__main__":
    main()
