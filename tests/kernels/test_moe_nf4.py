"""NF4 experts (one bitsandbytes 4-bit linear per expert, stacked): the stack's experts are the very
weights given, the reference equals 16-bit experts on the dequantized weights, and the grouped Triton
GEMMs (two launches per layer) equal the reference through TRITON_INTERPRET=1 on the CPU at small odd
shapes (nested and plain statistics; one subprocess for the file) and on a GPU at Qwen3-30B-A3B shapes,
replayed in a CUDA graph (`-m gpu`)."""

from __future__ import annotations

import functools
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

from sloth_kernels.moe import moe_experts_ref, route, swiglu_expert  # noqa: E402
from sloth_kernels.moe_nf4 import moe_experts_nf4, moe_experts_nf4_ref  # noqa: E402
from sloth_kernels.moe_nf4_format import GroupedNF4, stack_nf4  # noqa: E402
from sloth_kernels.nf4 import dequantize_nf4_ref, quantize_nf4_ref  # noqa: E402


def make_case(t: int, hidden: int, inter: int, num_experts: int, top_k: int, dtype: torch.dtype,
              nested: bool = True, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    x = torch.randn(t, hidden, dtype=dtype)
    gate = torch.randn(num_experts, hidden, dtype=dtype) / hidden**0.5
    ids, weights = route(x, gate, top_k, True, False)

    def grouped(out: int, inp: int) -> GroupedNF4:
        ws = [quantize_nf4_ref((torch.randn(out, inp) / inp**0.5).to(torch.bfloat16), compress_statistics=nested)
              for _ in range(num_experts)]
        stacked = stack_nf4([w.to(device) for w in ws])
        assert stacked is not None
        return stacked

    return x.to(device), ids.to(device), weights.to(device), grouped(inter, hidden), grouped(inter, hidden), grouped(hidden, inter)


def test_stacked_experts_are_the_weights_given_and_the_reference_is_their_dense_moe() -> None:
    torch.manual_seed(0)
    x, ids, weights, gate, up, down = make_case(7, 64, 40, 5, 2, torch.float32)
    dense_gu = torch.stack([torch.cat([dequantize_nf4_ref(gate.expert(e)), dequantize_nf4_ref(up.expert(e))])
                            for e in range(5)]).float()
    dense_d = torch.stack([dequantize_nf4_ref(down.expert(e)) for e in range(5)]).float()
    want = moe_experts_ref(x, ids, weights, 5, lambda e, rows: swiglu_expert(rows, dense_gu[e], dense_d[e]))
    torch.testing.assert_close(moe_experts_nf4_ref(x, ids, weights, gate, up, down), want)
    w = quantize_nf4_ref(torch.randn(40, 64))
    other = quantize_nf4_ref(torch.randn(40, 64), blocksize=128)
    assert stack_nf4([w, other]) is None  # mixed block sizes run one by one


# ---- Triton through the interpreter (CPU) -------------------------------------------------------

# name: (tokens, hidden, inter, experts, top_k, dtype, nested)
INTERPRETER_CASES = {
    "fp32-nested": (5, 64, 40, 6, 2, "fp32", True),
    "bf16-nested": (9, 96, 72, 5, 2, "bf16", True),
    "fp32-plain-absmax": (3, 64, 48, 4, 3, "fp32", False),
}
BOUND = {"fp32": 1e-5, "bf16": 2e-2}


def _interpreter_main() -> None:
    from sloth_kernels.triton_interp import patch_interpreter
    from sloth_kernels.triton_moe_nf4 import fused_moe_nf4

    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    results: dict[str, object] = {}
    for i, (name, (t, h, inter, e, k, dtype_name, nested)) in enumerate(INTERPRETER_CASES.items()):
        try:
            torch.manual_seed(i)
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            x, ids, weights, gate, up, down = make_case(t, h, inter, e, k, dtype, nested)
            got = fused_moe_nf4(x, ids, weights, gate, up, down).float()
            want = moe_experts_nf4_ref(x, ids, weights, gate, up, down).float()
            results[name] = [((got - want).norm() / want.norm()).item(), BOUND[dtype_name]]
        except Exception:  # reported per case by the test
            results[name] = traceback.format_exc()
    import json

    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(INTERPRETER_CASES))
def test_grouped_nf4_triton_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    result = interpreted[name]
    assert isinstance(result, list), f"{name} raised:\n{result}"
    err, bound = result
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.1g}"


@functools.cache
def qwen3_30b_a3b_experts() -> tuple[torch.Tensor, ...]:
    return make_case(1, 2048, 768, 128, 8, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 8, 64, 512])
def test_grouped_nf4_matches_reference_on_gpu(t: int) -> None:
    _, _, _, gate, up, down = qwen3_30b_a3b_experts()  # quantized once for every t
    torch.manual_seed(t)
    x = torch.randn(t, 2048, dtype=torch.bfloat16, device="cuda")
    ids, weights = route(x, torch.randn(128, 2048, dtype=torch.bfloat16, device="cuda") / 2048**0.5, 8, True, False)
    got = moe_experts_nf4(x, ids, weights, gate, up, down).float()
    ref = moe_experts_nf4_ref(x, ids, weights, gate, up, down).float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_nf4_replays_in_a_cuda_graph() -> None:
    torch.manual_seed(0)
    x, ids, weights, gate, up, down = make_case(8, 256, 128, 16, 2, torch.bfloat16, device="cuda")
    moe_experts_nf4(x, ids, weights, gate, up, down)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts_nf4(x, ids, weights, gate, up, down)
    x2, ids2, weights2, *_ = make_case(8, 256, 128, 16, 2, torch.bfloat16)
    x.copy_(x2), ids.copy_(ids2), weights.copy_(weights2)
    graph.replay()
    ref = moe_experts_nf4_ref(x, ids, weights, gate, up, down).float()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


if __name__ == "__main__":
    _interpreter_main()
