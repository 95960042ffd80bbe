"""gpt-oss's experts in Triton (sloth_kernels.triton_moe.fused_moe_gpt_oss: transformers' [E, hidden, 2 inter]
layout with gate/up columns interleaved, biases, the clamped SwiGLU) equal the expert-by-expert
reference through TRITON_INTERPRET=1 at small odd shapes with many clamped values, and on a GPU at
gpt-oss-20b's shapes, also replayed in a CUDA graph; the reference equals transformers' GptOssExperts."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from test_attention import run_interpreted

from sloth_kernels.moe import moe_experts_ref
from sloth_serve.models.gpt_oss_experts import clamped_swiglu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
LIMIT = 7.0


def make_case(t: int, hidden: int, inter: int, e: int, k: int, dtype: torch.dtype,
              device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Inputs whose gate/up values often pass the clamp limit (so the clamp is exercised)."""
    x = (torch.randn(t, hidden, device=device) * 2).to(dtype)
    w_gu = (torch.randn(e, hidden, 2 * inter, device=device) * 4 / hidden**0.5).to(dtype)
    b_gu = torch.randn(e, 2 * inter, device=device).to(dtype)
    w_d = (torch.randn(e, inter, hidden, device=device) / inter**0.5).to(dtype)
    b_d = torch.randn(e, hidden, device=device).to(dtype)
    logits = torch.randn(t, e, device=device)
    top, ids = torch.topk(logits, k, dim=-1)
    return x, ids, torch.softmax(top, dim=-1).to(dtype), w_gu, b_gu, w_d, b_d


def reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gu: torch.Tensor, b_gu: torch.Tensor,
              w_d: torch.Tensor, b_d: torch.Tensor) -> torch.Tensor:
    return moe_experts_ref(x, ids, weights, w_gu.shape[0],
                           lambda e, rows: clamped_swiglu(rows @ w_gu[e] + b_gu[e], LIMIT) @ w_d[e] + b_d[e])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_reference_equals_transformers_gpt_oss_experts() -> None:
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    torch.manual_seed(0)
    x, ids, weights, w_gu, b_gu, w_d, b_d = make_case(11, 32, 24, 5, 2, torch.float32)
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=5)
    theirs = GptOssExperts(cfg)
    with torch.no_grad():
        for name, value in (("gate_up_proj", w_gu), ("gate_up_proj_bias", b_gu), ("down_proj", w_d),
                            ("down_proj_bias", b_d)):
            getattr(theirs, name).copy_(value)
        assert (x @ w_gu[0] + b_gu[0]).abs().max() > 2 * LIMIT  # the clamp bites
        torch.testing.assert_close(reference(x, ids, weights, w_gu, b_gu, w_d, b_d), theirs(x, ids, weights),
                                   rtol=0, atol=0)


INTERPRETER_CASES = {  # name: (tokens, hidden, inter, experts, top_k, dtype, block_m)
    "decode_t1_fp32": (1, 48, 40, 6, 2, "fp32", 16),
    "t9_fp32_ragged": (9, 70, 36, 6, 3, "fp32", 16),
    "t11_bf16_block32": (11, 64, 48, 4, 4, "bf16", 32),
    "t5_fp16": (5, 32, 80, 4, 2, "fp16", 16),
}


def _interpreter_main() -> None:
    from sloth_kernels.triton_interp import patch_interpreter
    from sloth_kernels.triton_moe import fused_moe_gpt_oss

    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    results: dict[str, object] = {}
    for i, (name, (t, h, inter, e, k, dtype_name, block_m)) in enumerate(INTERPRETER_CASES.items()):
        torch.manual_seed(7000 + i)
        try:
            dtype = DTYPES[dtype_name]
            case = make_case(t, h, inter, e, k, dtype)
            got = fused_moe_gpt_oss(*case, LIMIT, block_m=block_m)
            ref = reference(*case)
            exact = reference(*(c.double() if c.is_floating_point() else c for c in case))
            results[name] = [rel_err(got, exact), max(BOUND[dtype], 2 * rel_err(ref, exact))]
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
    err, bound = result
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.1g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 8, 64, 512])
def test_triton_matches_reference_on_gpu_gpt_oss_20b_shapes(t: int) -> None:
    from sloth_kernels.triton_moe import fused_moe_gpt_oss

    torch.manual_seed(t)
    case = make_case(t, 2880, 2880, 32, 4, torch.bfloat16, device="cuda")
    assert rel_err(fused_moe_gpt_oss(*case, LIMIT), reference(*case)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpt_oss_experts_replay_in_a_cuda_graph() -> None:
    from sloth_kernels.triton_moe import fused_moe_gpt_oss

    torch.manual_seed(0)
    x, ids, weights, *params = make_case(8, 256, 128, 16, 4, torch.bfloat16, device="cuda")
    fused_moe_gpt_oss(x, ids, weights, *params, LIMIT)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_gpt_oss(x, ids, weights, *params, LIMIT)
    x2, ids2, weights2, *_ = make_case(8, 256, 128, 16, 4, torch.bfloat16, device="cuda")
    x.copy_(x2), ids.copy_(ids2), weights.copy_(weights2)
    graph.replay()
    assert rel_err(out, reference(x, ids, weights, *params)) < 1e-2


if __name__ == "__main__":
    _interpreter_main()
