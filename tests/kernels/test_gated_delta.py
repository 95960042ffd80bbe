"""The gated delta rule (Qwen3.5's linear attention): our token-by-token and chunked references equal
transformers' torch implementations; chunked prefill with the state carried equals one pass; the
Triton kernel equals the reference (outputs and states) under TRITON_INTERPRET=1 and on a GPU."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from test_attention import DTYPES, check_interpreted, interpreter_main, rel_err, run_interpreted

from kernels.gated_delta import CHUNK, gated_delta_rule, gated_delta_rule_ref
from kernels.state_batch import StateBatch


def make_inputs(lens: list[int], heads: int, dk: int, dv: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> tuple[torch.Tensor, ...]:
    t = sum(lens)
    q, k = (torch.randn(t, heads, dk, device=device).to(dtype) for _ in range(2))
    v = torch.randn(t, heads, dv, device=device).to(dtype)
    g = -torch.rand(t, heads, device=device) * 2  # log decay <= 0
    beta = torch.rand(t, heads, device=device)
    return q, k, v, g, beta


def make_batch(lens: list[int], initial: list[bool], slots: list[int], device: str = "cpu") -> StateBatch:
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    return StateBatch.build(qsl, slots, initial, torch.device(device))


def transformers_rule(q, k, v, g, beta, s0, chunked: bool):  # type: ignore[no-untyped-def]
    from transformers.models.qwen3_5.modeling_qwen3_5 import (
        torch_chunk_gated_delta_rule,
        torch_recurrent_gated_delta_rule,
    )

    fn = torch_chunk_gated_delta_rule if chunked else torch_recurrent_gated_delta_rule
    out, state = fn(q[None], k[None], v[None], g=g[None], beta=beta[None], initial_state=s0[None],
                    output_final_state=True, use_qk_l2norm_in_kernel=True)
    return out[0], state[0]


@pytest.mark.parametrize("n", [1, 5, CHUNK + 37])
def test_reference_equals_transformers(n: int) -> None:
    """A sequence continuing from a state: the one-step decode path (n = 1), short and chunked prompts."""
    torch.manual_seed(n)
    q, k, v, g, beta = make_inputs([n], 3, 16, 24)
    s0 = torch.randn(3, 16, 24) * 0.3
    state = torch.zeros(2, 3, 16, 24)
    state[1] = s0
    out = gated_delta_rule_ref(q, k, v, g, beta, state, make_batch([n], [True], [1]))
    ref_out, ref_state = transformers_rule(q, k, v, g, beta, s0, chunked=n > 1)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state[1], ref_state, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_equals_one_pass() -> None:
    """A prompt in pieces (1, 70, 3, 9 tokens: chunked and token-by-token forms mixed) gives one pass."""
    torch.manual_seed(0)
    n = 83
    q, k, v, g, beta = make_inputs([n], 2, 8, 8)
    whole_state = torch.zeros(1, 2, 8, 8)
    whole = gated_delta_rule_ref(q, k, v, g, beta, whole_state, make_batch([n], [False], [0]))
    state = torch.full((1, 2, 8, 8), 7.0)  # a stale state: the first piece must not read it
    pieces, start = [], 0
    for size in (1, 70, 3, 9):
        end = start + size
        pieces.append(gated_delta_rule_ref(q[start:end], k[start:end], v[start:end], g[start:end], beta[start:end],
                                           state, make_batch([size], [start > 0], [0])))
        start = end
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, whole_state, rtol=1e-4, atol=1e-4)


def triton_case(lens: list[int], initial: list[bool], heads: int, dk: int, dv: int, dtype: str) -> Callable:
    def run() -> tuple[float, float]:
        from kernels.triton_gated_delta import gated_delta_rule_triton

        q, k, v, g, beta = make_inputs(lens, heads, dk, dv, DTYPES[dtype])
        slots = random.Random(len(lens)).sample(range(len(lens) + 2), len(lens))
        batch = make_batch(lens, initial, slots)
        state = torch.randn(len(lens) + 2, heads, dk, dv) * 0.3
        ref_state = state.clone()
        out = gated_delta_rule_triton(q, k, v, g, beta, state, batch)
        ref = gated_delta_rule_ref(q, k, v, g, beta, ref_state, batch)
        bound = 1e-5 if dtype == "fp32" else 1e-2
        return max(rel_err(out, ref), rel_err(state, ref_state)), bound

    return run


CASES: dict[str, Callable] = {
    "decodes_fp32": triton_case([1, 1, 1], [True, True, True], 2, 16, 32, "fp32"),
    "mixed_fp32_odd_dims": triton_case([1, 7, 3], [True, False, True], 3, 12, 20, "fp32"),
    "prefill_bf16": triton_case([9, 1], [False, True], 2, 16, 96, "bf16"),
}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_gated_delta_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    check_interpreted(interpreted, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gated_delta_gpu_qwen3_5_shapes() -> None:
    torch.manual_seed(0)
    lens = [1] * 32 + [300]
    q, k, v, g, beta = make_inputs(lens, 32, 128, 128, torch.bfloat16, "cuda")
    batch = make_batch(lens, [n == 1 for n in lens], list(range(len(lens))), "cuda")
    state = torch.randn(len(lens), 32, 128, 128, device="cuda") * 0.1
    ref_state = state.clone()
    out = gated_delta_rule(q, k, v, g, beta, state, batch)
    ref = gated_delta_rule_ref(q, k, v, g, beta, ref_state, batch)
    assert rel_err(out, ref) < 1e-2 and rel_err(state, ref_state) < 1e-3


if __name__ == "__main__":
    interpreter_main(CASES)
