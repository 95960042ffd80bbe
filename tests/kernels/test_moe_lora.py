"""Expert LoRA on mixture-of-experts layers: the references equal a row-by-row float64 loop and the
experts with each slot's B A merged in (tokens without an adapter: the base, exactly), and the grouped
Triton shrink / expand inside the MoE launches (16-bit, gpt-oss's interleaved layout, NF4 experts)
equal the reference through TRITON_INTERPRET=1 on the CPU at small odd shapes (mixed slots, ranks
below the tables', a slot without LoRA on one projection; one subprocess for the file), and on a GPU
at Qwen3-30B-A3B shapes, replayed in a CUDA graph (`-m gpu`)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from test_attention import run_interpreted  # noqa: E402  (the shared subprocess harness)

from sloth_kernels.moe import (  # noqa: E402
    Project,
    moe_experts,
    moe_experts_lora_ref,
    moe_experts_ref,
    route,
    silu_and_mul,
    swiglu_expert,
)
from sloth_kernels.moe_lora import ExpertLoRA, MoELoRA, moe_lora_delta_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def make_tables(num_slots: int, num_experts: int, rank: int, dim_in: int, dim_out: int, ranks: list[int],
                dtype: torch.dtype, device: str = "cpu") -> ExpertLoRA:
    """Random A and B for each slot up to its rank (zeros past it, as the server's tables hold them)."""
    a = torch.zeros(num_slots, num_experts, rank, dim_in)
    b = torch.zeros(num_slots, num_experts, dim_out, rank)
    for s, r in enumerate(ranks):
        a[s, :, :r] = torch.randn(num_experts, r, dim_in) / dim_in**0.5
        b[s, :, :, :r] = torch.randn(num_experts, dim_out, r) / max(r, 1) ** 0.5
    return ExpertLoRA(a.to(device, dtype), b.to(device, dtype), torch.tensor(ranks, dtype=torch.int32, device=device))


def make_lora(t: int, hidden: int, inter: int, num_experts: int, dtype: torch.dtype, rank: int,
              gate_up_ranks: list[int], down_ranks: list[int], device: str = "cpu") -> MoELoRA:
    """Tokens spread over the slots and -1 (no adapter)."""
    num_slots = len(gate_up_ranks)
    slots = torch.randint(-1, num_slots, (t,), dtype=torch.int32)
    return MoELoRA(slots.to(device),
                   make_tables(num_slots, num_experts, rank, hidden, 2 * inter, gate_up_ranks, dtype, device),
                   make_tables(num_slots, num_experts, rank, inter, hidden, down_ranks, dtype, device))


def dense_projection(w13: torch.Tensor, w2: torch.Tensor) -> Project:
    return lambda e, proj, rows: torch.nn.functional.linear(rows, (w13 if proj == "gate_up" else w2)[e])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm()).item() if torch.isfinite(got).all() else float("inf")


def test_delta_reference_equals_row_by_row() -> None:
    torch.manual_seed(0)
    lora = make_tables(3, 5, 8, 24, 20, [8, 3, 0], torch.float32)
    inputs = torch.randn(17, 24)
    experts = torch.randint(0, 5, (17,))
    slots = torch.randint(-1, 3, (17,), dtype=torch.int32)
    want = torch.zeros(17, 20, dtype=torch.float64)
    for i in range(17):
        s, e = int(slots[i]), int(experts[i])
        if s >= 0:
            want[i] = lora.b[s, e].double() @ (lora.a[s, e].double() @ inputs[i].double())
    got = moe_lora_delta_ref(inputs, experts, slots, lora)
    assert rel_err(got, want) < 1e-6
    assert not got[slots < 0].any() and not got[slots == 2].any()  # no adapter / no LoRA here: zeros


def test_reference_is_each_slots_merged_experts_and_the_base_elsewhere() -> None:
    torch.manual_seed(1)
    t, hidden, inter, e = 13, 32, 24, 6
    x = torch.randn(t, hidden)
    ids, weights = route(x, torch.randn(e, hidden), 2, True, False)
    w13, w2 = torch.randn(e, 2 * inter, hidden) / hidden**0.5, torch.randn(e, hidden, inter) / inter**0.5
    lora = make_lora(t, hidden, inter, e, torch.float32, 4, [4, 2], [3, 4])
    got = moe_experts(x, ids, weights, w13, w2, lora=lora)
    base = moe_experts_ref(x, ids, weights, e, lambda j, rows: swiglu_expert(rows, w13[j], w2[j]))
    none = lora.slots < 0
    assert none.any() and torch.equal(got[none], base[none])
    for s in (0, 1):
        assert lora.gate_up is not None and lora.down is not None
        m13 = w13 + lora.gate_up.b[s] @ lora.gate_up.a[s]
        m2 = w2 + lora.down.b[s] @ lora.down.a[s]
        merged = moe_experts_ref(x, ids, weights, e, lambda j, rows, a=m13, b=m2: swiglu_expert(rows, a[j], b[j]))
        mine = lora.slots == s
        assert mine.any() and rel_err(got[mine], merged[mine]) < 1e-5
        assert rel_err(got[mine], base[mine]) > 1e-2


# ---- Triton through the interpreter (CPU) -------------------------------------------------------

# name: (kind, tokens, hidden, inter, experts, top_k, dtype, table rank, gate_up ranks, down ranks)
INTERPRETER_CASES = {
    "decode_t1_fp32": ("dense", 1, 48, 40, 8, 2, "fp32", 8, [8, 8], [8, 8]),
    "t13_bf16_ragged_ranks": ("dense", 13, 70, 36, 6, 2, "bf16", 16, [16, 5, 0], [3, 0, 16]),
    "t40_fp16_top4_rank24": ("dense", 40, 64, 48, 8, 4, "fp16", 24, [24, 7], [24, 24]),
    "t9_fp32_gpt_oss": ("gpt_oss", 9, 40, 24, 5, 2, "fp32", 4, [4, 2], [4, 0]),
    "t11_bf16_gpt_oss": ("gpt_oss", 11, 64, 48, 4, 3, "bf16", 8, [8, 8, 3], [8, 1, 8]),
    "t7_fp32_nf4": ("nf4", 7, 64, 40, 6, 2, "fp32", 4, [4, 3], [2, 4]),
    "t9_bf16_nf4": ("nf4", 9, 64, 72, 5, 2, "bf16", 8, [8, 0], [8, 8]),
}


def _dense_case(t: int, hidden: int, inter: int, e: int, k: int, dtype: torch.dtype, lora: MoELoRA,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Triton with LoRA, the reference with LoRA, Triton without) for 16-bit Qwen-style experts."""
    from sloth_kernels.triton_moe import fused_moe

    x = torch.randn(t, hidden, dtype=dtype)
    ids, weights = route(x, torch.randn(e, hidden, dtype=dtype), k, True, False)
    w13 = torch.randn(e, 2 * inter, hidden, dtype=dtype) / hidden**0.5
    w2 = torch.randn(e, hidden, inter, dtype=dtype) / inter**0.5
    ref = moe_experts_lora_ref(x, ids, weights, e, dense_projection(w13, w2), silu_and_mul, lora)
    return fused_moe(x, ids, weights, w13, w2, lora=lora), ref, fused_moe(x, ids, weights, w13, w2)


def _gpt_oss_case(t: int, hidden: int, inter: int, e: int, k: int, dtype: torch.dtype, lora: MoELoRA,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same for gpt-oss's experts (interleaved gate|up columns, biases, the clamped SwiGLU)."""
    from test_moe_gpt_oss import LIMIT, make_case

    from sloth_kernels.triton_moe import fused_moe_gpt_oss
    from sloth_serve.models.gpt_oss_experts import clamped_swiglu

    x, ids, weights, w_gu, b_gu, w_d, b_d = make_case(t, hidden, inter, e, k, dtype)

    def project(j: int, proj: str, rows: torch.Tensor) -> torch.Tensor:
        return rows @ w_gu[j] + b_gu[j] if proj == "gate_up" else rows @ w_d[j] + b_d[j]

    ref = moe_experts_lora_ref(x, ids, weights, e, project, lambda h: clamped_swiglu(h, LIMIT), lora)
    got = fused_moe_gpt_oss(x, ids, weights, w_gu, b_gu, w_d, b_d, LIMIT, lora=lora)
    return got, ref, fused_moe_gpt_oss(x, ids, weights, w_gu, b_gu, w_d, b_d, LIMIT)


def _nf4_case(t: int, hidden: int, inter: int, e: int, k: int, dtype: torch.dtype, lora: MoELoRA,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same for NF4 experts (the grouped stacks of one bitsandbytes weight per expert)."""
    from test_moe_nf4 import make_case

    from sloth_kernels.moe_nf4 import moe_experts_nf4_ref
    from sloth_kernels.triton_moe_nf4 import fused_moe_nf4

    x, ids, weights, gate, up, down = make_case(t, hidden, inter, e, k, dtype)
    ref = moe_experts_nf4_ref(x, ids, weights, gate, up, down, lora)
    got = fused_moe_nf4(x, ids, weights, gate, up, down, lora=lora)
    return got, ref, fused_moe_nf4(x, ids, weights, gate, up, down)


def _interpreter_main() -> None:
    from sloth_kernels.triton_interp import patch_interpreter

    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    results: dict[str, object] = {}
    cases = {"dense": _dense_case, "gpt_oss": _gpt_oss_case, "nf4": _nf4_case}
    for i, (name, (kind, t, h, inter, e, k, dtype_name, rank, gu_ranks, d_ranks)) in enumerate(
            INTERPRETER_CASES.items()):
        torch.manual_seed(7000 + i)
        try:
            dtype = DTYPES[dtype_name]
            lora = make_lora(t, h, inter, e, dtype, rank, gu_ranks, d_ranks)
            got, ref, base = cases[kind](t, h, inter, e, k, dtype, lora)
            none = lora.slots < 0
            base_kept = bool(torch.equal(got[none], base[none]))  # rows without an adapter: untouched
            changed = rel_err(got[~none], base[~none]) if (~none).any() else 1.0
            results[name] = [rel_err(got, ref), BOUND[dtype], float(base_kept), changed]
        except Exception:
            results[name] = traceback.format_exc()
    print("RESULTS " + __import__("json").dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(INTERPRETER_CASES))
def test_triton_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    result = interpreted[name]
    assert isinstance(result, list), f"{name} raised:\n{result}"
    err, bound, base_kept, changed = result
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.1g}"
    assert base_kept, f"{name}: rows without an adapter differ from the launches without LoRA"
    assert changed > 10 * bound, f"{name}: the LoRA changed the adapters' rows by only {changed:.3g}"


# ---- GPU (real sizes) ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 8, 64, 512])
def test_triton_matches_reference_on_gpu(t: int) -> None:
    torch.manual_seed(t)
    e, hidden, inter, dtype = 128, 2048, 768, torch.bfloat16
    x = torch.randn(t, hidden, dtype=dtype, device="cuda")
    ids, weights = route(x, torch.randn(e, hidden, dtype=dtype, device="cuda") / hidden**0.5, 8, True, False)
    w13 = torch.randn(e, 2 * inter, hidden, dtype=dtype, device="cuda") / hidden**0.5
    w2 = torch.randn(e, hidden, inter, dtype=dtype, device="cuda") / inter**0.5
    lora = make_lora(t, hidden, inter, e, dtype, 16, [16, 8, 0, 16], [16, 16, 4, 0], device="cuda")
    got = moe_experts(x, ids, weights, w13, w2, lora=lora)
    ref = moe_experts_lora_ref(x, ids, weights, e, dense_projection(w13, w2), silu_and_mul, lora)
    assert rel_err(got, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_lora_replays_in_a_cuda_graph() -> None:
    """New tokens, routing and slots copied into the captured inputs: the replay computes them."""
    torch.manual_seed(0)
    t, e, hidden, inter, dtype = 8, 16, 256, 128, torch.bfloat16
    x = torch.randn(t, hidden, dtype=dtype, device="cuda")
    ids, weights = route(x, torch.randn(e, hidden, dtype=dtype, device="cuda"), 2, True, False)
    w13 = torch.randn(e, 2 * inter, hidden, dtype=dtype, device="cuda") / hidden**0.5
    w2 = torch.randn(e, hidden, inter, dtype=dtype, device="cuda") / inter**0.5
    lora = make_lora(t, hidden, inter, e, dtype, 8, [8, 4], [8, 8], device="cuda")
    moe_experts(x, ids, weights, w13, w2, lora=lora)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts(x, ids, weights, w13, w2, lora=lora)
    x.copy_(torch.randn_like(x))
    new_ids, new_weights = route(x, torch.randn(e, hidden, dtype=dtype, device="cuda"), 2, True, False)
    ids.copy_(new_ids), weights.copy_(new_weights), lora.slots.copy_(lora.slots.flip(0))
    graph.replay()
    ref = moe_experts_lora_ref(x, ids, weights, e, dense_projection(w13, w2), silu_and_mul, lora)
    assert rel_err(out, ref) < 1e-2


if __name__ == "__main__":
    _interpreter_main()
