"""Mixture of experts: the router equals transformers' (softmax in float32, top-k, renormalized or
not), the reference experts equal a per-token loop, the device-side alignment groups every
assignment once, and the grouped Triton GEMMs equal the reference through TRITON_INTERPRET=1 on the
CPU at small odd shapes (one subprocess for the file) and on a GPU at Qwen3-30B-A3B shapes (`-m gpu`)."""

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

from sloth_kernels.moe import moe_experts, moe_experts_ref, route, swiglu_expert  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def make_case(t: int, hidden: int, inter: int, num_experts: int, top_k: int, dtype: torch.dtype,
              device: str = "cpu", normalize: bool = True, fp32_weights: bool = False) -> tuple[torch.Tensor, ...]:
    x = torch.randn(t, hidden, dtype=dtype, device=device)
    gate = torch.randn(num_experts, hidden, dtype=dtype, device=device) / hidden**0.5
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device=device) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, inter, dtype=dtype, device=device) / inter**0.5
    ids, weights = route(x, gate, top_k, normalize, fp32_weights)
    return x, ids, weights, w_gate_up, w_down


def per_token(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor) -> torch.Tensor:
    """float64, token by token: what every implementation approximates."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            y = swiglu_expert(x[t : t + 1].double().cpu(), w_gate_up[e].double().cpu(), w_down[e].double().cpu())
            out[t] += float(weights[t, k]) * y[0]
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.double().cpu()
    return ((got - want).norm() / want.norm()).item() if torch.isfinite(got).all() else float("inf")


def test_router_is_softmax_top_k_renormalized_or_not() -> None:
    torch.manual_seed(0)
    x, gate = torch.randn(5, 16), torch.randn(6, 16)
    probs = torch.softmax(x @ gate.T, dim=-1)
    ids, raw = route(x, gate, 2, normalize=False, weights_fp32=False)
    want, want_ids = torch.topk(probs, 2, dim=-1)
    assert torch.equal(ids, want_ids) and torch.allclose(raw, want)
    _, norm = route(x, gate, 2, normalize=True, weights_fp32=False)
    assert torch.allclose(norm, want / want.sum(-1, keepdim=True)) and torch.allclose(norm.sum(-1), torch.ones(5))
    _, bf16 = route(x.bfloat16(), gate.bfloat16(), 2, normalize=True, weights_fp32=False)
    _, fp32 = route(x.bfloat16(), gate.bfloat16(), 2, normalize=True, weights_fp32=True)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32


def test_reference_equals_token_by_token() -> None:
    torch.manual_seed(1)
    x, ids, weights, w13, w2 = make_case(11, 24, 20, 6, 2, torch.float32)
    got = moe_experts(x, ids, weights, w13, w2)  # the CPU dispatch is the reference
    assert rel_err(got, per_token(x, ids, weights, w13, w2)) < 1e-6


def test_reference_skips_experts_no_token_chose() -> None:
    torch.manual_seed(2)
    x, _, _, w13, w2 = make_case(4, 16, 8, 8, 2, torch.float32)
    ids = torch.tensor([[3, 5], [5, 3], [3, 5], [5, 3]])
    weights = torch.rand(4, 2)
    w13[[0, 1, 2, 4, 6, 7]] = float("nan")  # never read
    got = moe_experts_ref(x, ids, weights, 8, lambda e, rows: swiglu_expert(rows, w13[e], w2[e]))
    assert rel_err(got, per_token(x, ids, weights, w13, w2)) < 1e-6


# ---- Triton through the interpreter (CPU) -------------------------------------------------------

# name: (tokens, hidden, expert width, experts, top_k, dtype, block_m, fp32 routing weights)
INTERPRETER_CASES = {
    "decode_t1_fp32_8x2": (1, 48, 40, 8, 2, "fp32", 16, False),
    "t13_bf16_ragged_dims": (13, 70, 36, 6, 2, "bf16", 16, False),
    "t40_fp16_top4_block32": (40, 64, 48, 8, 4, "fp16", 32, False),
    "t9_bf16_mixtral_fp32_weights": (9, 32, 80, 4, 2, "bf16", 16, True),
}


def _interpreter_main() -> None:
    from sloth_kernels.triton_interp import patch_interpreter
    from sloth_kernels.triton_moe import align_by_expert, fused_moe

    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    results: dict[str, object] = {}
    for i, (name, (t, h, inter, e, k, dtype_name, block_m, fp32w)) in enumerate(INTERPRETER_CASES.items()):
        torch.manual_seed(5000 + i)
        try:
            dtype = DTYPES[dtype_name]
            x, ids, weights, w13, w2 = make_case(t, h, inter, e, k, dtype, fp32_weights=fp32w)
            rows, block_expert = align_by_expert(ids, e, block_m)
            valid = rows[rows < t * k].sort().values
            grouped = all(int(ids.reshape(-1)[int(r)]) == int(block_expert[j // block_m])
                          for j, r in enumerate(rows.tolist()) if r < t * k)
            aligned = torch.equal(valid, torch.arange(t * k, dtype=torch.int32)) and grouped
            got = fused_moe(x, ids, weights, w13, w2, block_m=block_m)
            ref = moe_experts_ref(x, ids, weights, e, lambda j, rows, a=w13, b=w2: swiglu_expert(rows, a[j], b[j]))
            want = per_token(x, ids, weights, w13, w2)
            results[name] = [rel_err(got, want), max(BOUND[dtype], 2 * rel_err(ref, want)), float(aligned)]
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
    err, bound, aligned = result
    assert aligned, f"{name}: the alignment lost or misfiled an assignment"
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.1g}"


# ---- GPU (real sizes) ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 8, 64, 512])
def test_triton_matches_reference_on_gpu(t: int) -> None:
    torch.manual_seed(t)
    x, ids, weights, w13, w2 = make_case(t, 2048, 768, 128, 8, torch.bfloat16, device="cuda")
    got = moe_experts(x, ids, weights, w13, w2)
    ref = moe_experts_ref(x, ids, weights, 128, lambda e, rows: swiglu_expert(rows, w13[e], w2[e]))
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_path_replays_in_a_cuda_graph() -> None:
    torch.manual_seed(0)
    x, ids, weights, w13, w2 = make_case(8, 256, 128, 16, 2, torch.bfloat16, device="cuda")
    moe_experts(x, ids, weights, w13, w2)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts(x, ids, weights, w13, w2)
    x2, ids2, weights2, _, _ = make_case(8, 256, 128, 16, 2, torch.bfloat16, device="cuda")
    x.copy_(x2), ids.copy_(ids2), weights.copy_(weights2)
    graph.replay()
    ref = moe_experts_ref(x, ids, weights, 16, lambda e, rows: swiglu_expert(rows, w13[e], w2[e]))
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


if __name__ == "__main__":
    _interpreter_main()
