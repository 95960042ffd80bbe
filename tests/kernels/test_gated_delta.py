"""The gated delta rule (Qwen3.5's linear attention): our token-by-token and chunked references equal
transformers' torch implementations; chunked prefill with the state carried equals one pass; the
Triton kernels (token by token, and chunked for long prompts) equal the token-by-token reference
(outputs and states) under TRITON_INTERPRET=1 and on a GPU."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from test_attention import DTYPES, check_interpreted, interpreter_main, rel_err, run_interpreted

from sloth_kernels.gated_delta import gated_delta_rule, gated_delta_rule_ref
from sloth_kernels.gated_delta_inputs import CHUNK
from sloth_kernels.state_batch import StateBatch


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


SEQUENTIAL = 1 << 30  # gated_delta_rule_ref's chunked_from: every sequence token by token


def triton_case(lens: list[int], initial: list[bool], heads: int, dk: int, dv: int, dtype: str) -> Callable:
    """The kernels against the token-by-token reference: sequences of CHUNK tokens or more take the
    chunked kernels, the others (in the same step) the token-by-token one."""

    def run() -> tuple[float, float]:
        from sloth_kernels.triton_gated_delta import gated_delta_rule_triton

        q, k, v, g, beta = make_inputs(lens, heads, dk, dv, DTYPES[dtype])
        slots = random.Random(len(lens)).sample(range(len(lens) + 2), len(lens))
        batch = make_batch(lens, initial, slots)
        state = torch.randn(len(lens) + 2, heads, dk, dv) * 0.3
        ref_state = state.clone()
        out = gated_delta_rule_triton(q, k, v, g, beta, state, batch)
        ref = gated_delta_rule_ref(q, k, v, g, beta, ref_state, batch, chunked_from=SEQUENTIAL)
        bound = 1e-5 if dtype == "fp32" else 1e-2
        return max(rel_err(out, ref), rel_err(state, ref_state)), bound

    return run


def triton_pieces_case(sizes: list[int]) -> Callable:
    """A prompt prefilled in pieces (chunked and token-by-token kernels mixed, the state carried
    between calls) gives the outputs and final state of one chunked pass over it."""

    def run() -> tuple[float, float]:
        from sloth_kernels.triton_gated_delta import gated_delta_rule_triton

        n = sum(sizes)
        q, k, v, g, beta = make_inputs([n], 2, 16, 24)
        whole_state = torch.zeros(1, 2, 16, 24)
        whole = gated_delta_rule_triton(q, k, v, g, beta, whole_state, make_batch([n], [False], [0]))
        state = torch.full((1, 2, 16, 24), 7.0)  # a stale state: the first piece must not read it
        pieces, start = [], 0
        for size in sizes:
            end = start + size
            pieces.append(gated_delta_rule_triton(q[start:end], k[start:end], v[start:end], g[start:end],
                                                  beta[start:end], state, make_batch([size], [start > 0], [0])))
            start = end
        return max(rel_err(torch.cat(pieces), whole), rel_err(state, whole_state)), 1e-5

    return run


CASES: dict[str, Callable] = {
    "decodes_fp32": triton_case([1, 1, 1], [True, True, True], 2, 16, 32, "fp32"),
    "mixed_fp32_odd_dims": triton_case([1, 7, 3], [True, False, True], 3, 12, 20, "fp32"),
    "prefill_bf16": triton_case([9, 1], [False, True], 2, 16, 96, "bf16"),
    # chunked: a partial last chunk, exactly one chunk, a new prompt and a continued one, beside short ones
    "chunked_fp32_odd_dims": triton_case([CHUNK + 37, 1, CHUNK, 5], [True, True, False, False], 2, 12, 20, "fp32"),
    "chunked_bf16": triton_case([2 * CHUNK + 3, 1], [False, True], 2, 16, 40, "bf16"),
    "chunked_pieces_fp32": triton_pieces_case([1, CHUNK + 6, 3, 2 * CHUNK + 1]),
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
    """Qwen3.5-9B's shapes: decodes beside long prompts (chunked: a partial last chunk, an exact one,
    one continuing its state) equal the token-by-token reference."""
    torch.manual_seed(0)
    lens = [1] * 32 + [300, CHUNK, 2 * CHUNK + 1]
    initial = [True] * 32 + [False, False, True]
    q, k, v, g, beta = make_inputs(lens, 32, 128, 128, torch.bfloat16, "cuda")
    batch = make_batch(lens, initial, list(range(len(lens))), "cuda")
    state = torch.randn(len(lens), 32, 128, 128, device="cuda") * 0.1
    ref_state = state.clone()
    out = gated_delta_rule(q, k, v, g, beta, state, batch)
    ref = gated_delta_rule_ref(q, k, v, g, beta, ref_state, batch, chunked_from=SEQUENTIAL)
    assert rel_err(out, ref) < 1e-2 and rel_err(state, ref_state) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gated_delta_gpu_chunked_prefill_in_pieces_equals_one_pass() -> None:
    """A 1000-token prompt in pieces (an engine's chunked prefill: chunked and token-by-token kernels,
    the state carried) equals one pass, in float32, and the token-by-token kernel over the whole
    prompt. The chunked kernels' retiling (it asked 263 KB of shared memory at 128 x 128 heads, past
    the H200's 227 KB; now 80 KB when compiled for sm_90, tests/kernels/test_compile_sm90.py) has not
    run on a GPU yet: this is the test to run."""
    from sloth_kernels.triton_gated_delta import gated_delta_rule_triton

    torch.manual_seed(1)
    q, k, v, g, beta = make_inputs([1000], 32, 128, 128, torch.float32, "cuda")
    whole_state = torch.zeros(1, 32, 128, 128, device="cuda")
    whole = gated_delta_rule_triton(q, k, v, g, beta, whole_state, make_batch([1000], [False], [0], "cuda"))
    state, pieces, start = torch.zeros_like(whole_state), [], 0
    for size in (300, 1, 63, 512, 124):
        end = start + size
        batch = make_batch([size], [start > 0], [0], "cuda")
        pieces.append(gated_delta_rule_triton(q[start:end], k[start:end], v[start:end], g[start:end],
                                              beta[start:end], state, batch))
        start = end
    assert rel_err(torch.cat(pieces), whole) < 1e-4 and rel_err(state, whole_state) < 1e-4
    token_state = torch.zeros_like(whole_state)
    tokens = gated_delta_rule_triton(q, k, v, g, beta, token_state, make_batch([1000], [False], [0], "cuda"),
                                     chunked_from=SEQUENTIAL)
    assert rel_err(whole, tokens) < 1e-4 and rel_err(whole_state, token_state) < 1e-4


if __name__ == "__main__":
    interpreter_main(CASES)
