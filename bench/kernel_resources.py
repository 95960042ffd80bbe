"""What each Triton kernel asks of an H200 at the shapes the models launch it with (Llama-3-8B,
Qwen3.5-9B, gpt-oss-20b): the dispatch code runs on CPU tensors of those shapes and every launch it
makes is compiled for sm_90 instead of run (sloth_kernels.compile_check), so no GPU is needed. Prints
a table (kernel, config, shared bytes, registers, stack bytes) and exits 1 when a kernel needs more
shared memory than a block may use or spills past its budget (KNOWN_SPILLS, else STACK_BUDGET).

    PYTHONPATH=. python bench/kernel_resources.py [--cases gated_delta,attention] [--all-variants]

--all-variants also compiles every attention tile the dispatcher can pick (compile_variants), and
the NF4 GEMV / GEMM at every tuned row bucket: minutes of ptxas. tests/kernels/test_compile_sm90.py
runs the representative cases (compiled kernels land in Triton's cache, so a second run is quick).
Recorded: bench/results/kernel-resources-sm90.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sloth_kernels.compile_check import SM90_SHARED_LIMIT, KernelResources, compiled_launches
from sloth_kernels.nf4_format import NF4Weight
from sloth_kernels.ssm_params import SSMParams
from sloth_kernels.state_batch import StateBatch

BF16 = torch.bfloat16
# Stack bytes per thread (spilled registers) a kernel may use: a few hundred is the odd value ptxas
# moves out of a full register file; the two listed spill kilobytes per thread in their chunk loops
# (float32 tiles as tensor-core operands), measured so, kept as a ceiling so that it does not grow.
STACK_BUDGET = 256
KNOWN_SPILLS = {
    "_chunk_state_kernel": 2048,  # gated delta, chunked: 1,960 bytes at 128 x 128 heads (3xTF32)
    "_scan_kernel": 6144,  # SSD chunk scan: 5,944 bytes at 64-dim heads, state 128 (IEEE float32 products)
}
BLOCK_SIZE = 16  # the paged KV cache's tokens per block
PREFILL = 512  # tokens of the prefill step the cases launch (a prompt chunk)


def _batch(lens: list[int]) -> StateBatch:
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    return StateBatch.build(qsl, list(range(len(lens))), [False] * len(lens), torch.device("cpu"))


def _attention(heads: int, kv_heads: int, head_dim: int, window: int | None = None, sinks: bool = False,
               all_variants: bool = False) -> None:
    from sloth_kernels.triton_attention import compile_variants, paged_attention_triton, write_kv_triton

    num_blocks = PREFILL // BLOCK_SIZE + 2
    k_cache = torch.empty(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=BF16)
    v_cache = torch.empty_like(k_cache)
    sink = torch.zeros(heads, dtype=torch.float32) if sinks else None
    if all_variants:
        compile_variants(heads, k_cache, v_cache, 0, 4096, window, sinks=sink)
        return
    kv = torch.empty(PREFILL, kv_heads, head_dim, dtype=BF16)
    write_kv_triton(kv, kv, k_cache, v_cache, torch.arange(PREFILL, dtype=torch.long))
    tables = torch.arange(num_blocks - 2, dtype=torch.int32)[None]
    for n in (1, PREFILL):  # a decode token after the prompt, then the prompt itself
        q = torch.empty(n, heads, head_dim, dtype=BF16)
        lens = torch.tensor([PREFILL], dtype=torch.int32)
        paged_attention_triton(q, k_cache, v_cache, tables, lens, torch.tensor([0, n], dtype=torch.int32), n,
                               head_dim ** -0.5, window, sinks=sink)


def _nf4(out_features: int, in_features: int) -> NF4Weight:
    numel = out_features * in_features
    return NF4Weight(data=torch.empty((numel + 1) // 2, dtype=torch.uint8), absmax=torch.empty(numel // 64,
                     dtype=torch.uint8), code=torch.zeros(16), shape=(out_features, in_features), dtype=BF16,
                     state2_absmax=torch.ones(-(-numel // 64 // 256)), state2_code=torch.zeros(256),
                     offset=torch.zeros(()))


def _nf4_linears(all_variants: bool) -> None:
    """Llama-3-8B's projections (fused q|k|v, o, gate|up, down) at the row counts of a decode step,
    a batch of decodes and a prefill chunk: the tuned GEMV (FMA and tl.dot), GEMM and dequantize."""
    from sloth_kernels.triton_nf4 import nf4_matmul

    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)] if all_variants else [(28672, 4096)]
    rows = (1, 16, 64, 128, 512) if all_variants else (1, 16, 128, 512)
    for n, k in shapes:
        w = _nf4(n, k)
        for m in rows:
            nf4_matmul(torch.empty(m, k, dtype=BF16), w)


def _lora() -> None:
    """Multi-LoRA on Llama-3-8B's fused q|k|v (rank 16, 8 slots) at a decode batch and a prefill."""
    from sloth_kernels.triton_lora import add_lora_triton

    slices = [4096, 1024, 1024]
    a = torch.empty(8, 3 * 16, 4096, dtype=BF16)
    b = torch.empty(8, sum(slices), 16, dtype=BF16)
    for t in (16, PREFILL):
        add_lora_triton(torch.empty(t, sum(slices), dtype=BF16), torch.empty(t, 4096, dtype=BF16), a, b,
                        torch.zeros(t, dtype=torch.int32), slices=slices)


def _nf4_lora() -> None:
    """The fused NF4 GEMV with multi-LoRA (--fused-lora) on Llama-3-8B's projections at decode row
    counts: fused q|k|v at rank 32 (a 96-row stacked shrink, the widest MAX_FUSED_RANK admits at three
    slices), gate|up at rank 16, down at rank 64, 8 slots each."""
    from sloth_kernels.triton_nf4_lora import fusable, nf4_lora_matmul

    for slices, k, rank in (([4096, 1024, 1024], 4096, 32), ([14336, 14336], 4096, 16), ([4096], 14336, 64)):
        w = _nf4(sum(slices), k)
        a = torch.empty(8, len(slices) * rank, k, dtype=BF16)
        b = torch.empty(8, sum(slices), rank, dtype=BF16)
        for m in (1, 16, 64):
            x = torch.empty(m, k, dtype=BF16)
            assert fusable(x, w, a, slices)
            nf4_lora_matmul(x, w, a, b, torch.zeros(m, dtype=torch.int32), slices, torch.full((8,), rank, dtype=torch.int32))


def _moe() -> None:
    """gpt-oss-20b's experts (32, top 4, hidden = inter = 2880, 16-bit) with rank-16 expert LoRA."""
    from sloth_kernels.moe_lora import ExpertLoRA, MoELoRA
    from sloth_kernels.triton_moe import fused_moe_gpt_oss

    experts, hidden, inter, top_k = 32, 2880, 2880, 4
    lora = MoELoRA(torch.zeros(PREFILL, dtype=torch.int32),
                   ExpertLoRA(torch.empty(2, experts, 16, hidden, dtype=BF16),
                              torch.empty(2, experts, 2 * inter, 16, dtype=BF16), torch.full((2,), 16, dtype=torch.int32)),
                   ExpertLoRA(torch.empty(2, experts, 16, inter, dtype=BF16),
                              torch.empty(2, experts, hidden, 16, dtype=BF16), torch.full((2,), 16, dtype=torch.int32)))
    for t in (4, PREFILL):
        ids = torch.arange(t * top_k, dtype=torch.long).view(t, top_k) % experts
        fused_moe_gpt_oss(torch.empty(t, hidden, dtype=BF16), ids, torch.full((t, top_k), 0.25),
                          torch.empty(experts, hidden, 2 * inter, dtype=BF16), torch.empty(experts, 2 * inter, dtype=BF16),
                          torch.empty(experts, inter, hidden, dtype=BF16), torch.empty(experts, hidden, dtype=BF16),
                          7.0, lora=MoELoRA(lora.slots[:t], lora.gate_up, lora.down))


def _gated_delta() -> None:
    """Qwen3.5-9B's Gated DeltaNet (32 value heads, key and value dims 128): decodes, a long prompt
    (chunked) beside them, and its convolution and gated norm."""
    from sloth_kernels.gated_delta_inputs import CHUNK
    from sloth_kernels.triton_conv import causal_conv1d_triton
    from sloth_kernels.triton_gated_delta import gated_delta_rule_triton
    from sloth_kernels.triton_gated_norm import gated_rms_norm_triton

    heads, dim = 32, 128
    lens = [1, 1, 4 * CHUNK + 3]
    t = sum(lens)
    batch = _batch(lens)
    q = torch.empty(t, heads, dim, dtype=BF16)
    state = torch.empty(len(lens), heads, dim, dim)
    gated_delta_rule_triton(q, q, q, torch.zeros(t, heads), torch.zeros(t, heads), state, batch)
    decodes = _batch([1, 1])  # a decode step: the token-by-token kernel alone
    gated_delta_rule_triton(q[:2], q[:2], q[:2], torch.zeros(2, heads), torch.zeros(2, heads), state, decodes)
    conv_dim = 2 * 16 * dim + heads * dim
    x = torch.empty(t, conv_dim, dtype=BF16)
    causal_conv1d_triton(x, torch.empty(conv_dim, 4, dtype=BF16), None, torch.empty(len(lens), conv_dim, 3, dtype=BF16),
                         batch, silu=True)
    y = torch.empty(t, heads * dim, dtype=BF16)
    gated_rms_norm_triton(y, y, torch.ones(dim), 1e-6, dim)


def _ssd() -> None:
    """A Mamba-2 layer of Granite-4 / Nemotron-H's size (128 heads of 64, state 128, 1 group)."""
    from sloth_kernels.triton_ssd import ssd_chunk_scan_triton, ssd_update_triton

    heads, dim, n = 128, 64, 128
    params = SSMParams(torch.full((heads,), -1.0), torch.ones(heads), torch.zeros(heads))
    state = torch.empty(2, heads, dim, n)
    lens = [1, PREFILL]
    batch = _batch(lens)
    t = sum(lens)
    x, dt, b = torch.empty(t, heads, dim, dtype=BF16), torch.empty(t, heads, dtype=BF16), torch.empty(t, 1, n, dtype=BF16)
    ssd_chunk_scan_triton(x, dt, b, b, params, state, batch.query_start_loc, batch.slots, batch.has_initial)
    ssd_update_triton(x[:1], dt[:1], b[:1], b[:1], params, state, batch.slots[:1])


def _norm_rope_sampling() -> None:
    """RMSNorm (with the residual add) at hidden 4096, RoPE for Llama-3-8B and Qwen3.5-9B's partial
    rotary (head 256, 64 rotated), sampling over gpt-oss's 201,088-token vocabulary."""
    from sloth_kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
    from sloth_kernels.triton_rope import apply_rope_triton
    from sloth_kernels.triton_sampling import sample_triton

    x = torch.empty(PREFILL, 4096, dtype=BF16)
    rms_norm_triton(x, torch.ones(4096, dtype=BF16), 1e-5)
    add_rms_norm_triton(x, torch.empty_like(x), torch.ones(4096, dtype=BF16), 1e-5)
    positions = torch.zeros(PREFILL, dtype=torch.long)
    for heads, kv_heads, head_dim, rotary in ((32, 8, 128, 128), (16, 4, 256, 64)):
        table = torch.empty(4096, rotary // 2)
        apply_rope_triton(torch.empty(PREFILL, heads, head_dim, dtype=BF16),
                          torch.empty(PREFILL, kv_heads, head_dim, dtype=BF16), positions, table, table)
    rows = 32
    ones = torch.ones(rows)
    sample_triton(torch.empty(rows, 201088), ones, torch.zeros(rows, dtype=torch.int32), ones, ones * 0,
                  torch.empty(rows, 201088))


def cases(all_variants: bool = False) -> dict[str, Callable[[], None]]:
    return {
        "attention_llama3_8b": lambda: _attention(32, 8, 128, all_variants=all_variants),
        "attention_qwen3_5_9b": lambda: _attention(16, 4, 256, all_variants=all_variants),
        # Gemma 4's full layers: 512-wide heads (global_head_dim), 2 KV heads of 8 query heads (E4B)
        "attention_gemma4_global": lambda: _attention(8, 2, 512, all_variants=all_variants),
        "attention_gpt_oss_20b": lambda: _attention(64, 8, 64, window=128, sinks=True, all_variants=all_variants),
        "nf4_llama3_8b": lambda: _nf4_linears(all_variants),
        "lora_llama3_8b": _lora,
        "nf4_lora_llama3_8b": _nf4_lora,
        "moe_gpt_oss_20b": _moe,
        "gated_delta_qwen3_5_9b": _gated_delta,
        "ssd_mamba2": _ssd,
        "norm_rope_sampling": _norm_rope_sampling,
    }


def stack_budget(kernel: str) -> int:
    return KNOWN_SPILLS.get(kernel, STACK_BUDGET)


def compile_case(case: Callable[[], None]) -> list[KernelResources]:
    with compiled_launches() as found:
        case()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--all-variants", action="store_true")
    args = parser.parse_args()
    table = cases(args.all_variants)
    names = [n for n in args.cases.split(",") if n] or list(table)
    print(f"| case | kernel | config | shared bytes (limit {SM90_SHARED_LIMIT}) | registers | stack bytes |")
    print("|---|---|---|---:|---:|---:|")
    problems = []
    for name in names:
        start = time.perf_counter()
        for r in compile_case(table[name]):
            print(f"| {name} | {r.kernel} | {r.config} | {r.shared} | {r.registers} | {r.stack} |", flush=True)
            problems += r.problems(stack_limit=stack_budget(r.kernel))
        print(f"<!-- {name}: {time.perf_counter() - start:.0f} s -->", flush=True)
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
