"""The causal depthwise convolution with per-sequence state: the Triton kernel equals the PyTorch
reference (outputs and the state it leaves) under TRITON_INTERPRET=1 and on a GPU, on mixed batches
of decodes, short chunks and new prompts; and chunked prefill leaves what one pass leaves."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from test_attention import DTYPES, check_interpreted, interpreter_main, rel_err, run_interpreted

from sloth_kernels.conv import causal_conv1d, causal_conv1d_ref
from sloth_kernels.state_batch import StateBatch

BOUND = {"fp32": 1e-6, "fp16": 2e-3, "bf16": 1e-2}


def make_batch(lens: list[int], initial: list[bool], num_slots: int, device: str = "cpu",
               slots: list[int] | None = None) -> StateBatch:
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    slots = slots or random.Random(len(lens)).sample(range(num_slots), len(lens))
    return StateBatch.build(qsl, slots, initial, torch.device(device))


def conv_case(lens: list[int], initial: list[bool], dim: int, k: int, dtype: str, bias: bool = True,
              silu: bool = False) -> Callable:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_conv import causal_conv1d_triton

        dt = DTYPES[dtype]
        batch = make_batch(lens, initial, num_slots=len(lens) + 2)
        x = torch.randn(sum(lens), dim).to(dt)
        weight = torch.randn(dim, k).to(dt)
        b = torch.randn(dim).to(dt) if bias else None
        state = torch.randn(len(lens) + 2, dim, k - 1).to(dt)
        ref_state = state.clone()
        out = causal_conv1d_triton(x, weight, b, state, batch, silu)
        ref = causal_conv1d_ref(x, weight, b, ref_state, batch, silu)
        return max(rel_err(out, ref), rel_err(state, ref_state)), BOUND[dtype]

    return run


CASES: dict[str, Callable] = {
    "decodes_fp32": conv_case([1, 1, 1], [True, True, True], 40, 3, "fp32"),
    "mixed_fp32": conv_case([1, 1, 7, 2, 19], [True, True, False, True, True], 72, 3, "fp32"),
    "short_chunks_k4_bf16": conv_case([1, 2, 3, 33], [True, True, False, True], 300, 4, "bf16"),
    "new_prompts_fp16_no_bias": conv_case([5, 17], [False, False], 64, 3, "fp16", bias=False),
    "silu_k4_fp32": conv_case([1, 6, 2], [True, False, True], 96, 4, "fp32", bias=False, silu=True),
}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_conv_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    check_interpreted(interpreted, name)


def test_chunked_conv_equals_one_pass() -> None:
    """A prompt run in chunks of 1, 2 and 5 tokens (the state carried) gives one pass's outputs and state."""
    torch.manual_seed(0)
    dim, k, n = 24, 3, 13
    x, weight, bias = torch.randn(n, dim), torch.randn(dim, k), torch.randn(dim)
    whole_state = torch.zeros(2, dim, k - 1)
    whole = causal_conv1d_ref(x, weight, bias, whole_state, make_batch([n], [False], 2, slots=[1]))
    state = torch.zeros(2, dim, k - 1)
    pieces, start = [], 0
    for size in (1, 2, 5, 5):
        batch = make_batch([size], [start > 0], 2, slots=[1])
        pieces.append(causal_conv1d_ref(x[start : start + size], weight, bias, state, batch))
        start += size
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, whole_state)


def test_new_prompt_ignores_stale_state() -> None:
    """A slot handed to a new sequence still holds its last owner's state: a first chunk must not read it."""
    dim, k = 8, 3
    x, weight = torch.randn(4, dim), torch.randn(dim, k)
    batch = make_batch([4], [False], 1)
    clean = causal_conv1d_ref(x, weight, None, torch.zeros(1, dim, k - 1), batch)
    stale = causal_conv1d_ref(x, weight, None, torch.randn(1, dim, k - 1), batch)
    assert torch.equal(clean, stale)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("lens", [[1] * 64, [1] * 8 + [512, 77]])
def test_conv_gpu_lfm2_shapes(lens: list[int]) -> None:
    torch.manual_seed(0)
    dim, k = 2048, 3
    batch = make_batch(lens, [n == 1 for n in lens], len(lens) + 1, "cuda")
    x = torch.randn(sum(lens), dim, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(dim, k, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(len(lens) + 1, dim, k - 1, device="cuda", dtype=torch.bfloat16)
    ref_state = state.clone()
    out = causal_conv1d(x, weight, None, state, batch)
    ref = causal_conv1d_ref(x, weight, None, ref_state, batch)
    assert rel_err(out, ref) < BOUND["bf16"] and rel_err(state, ref_state) < BOUND["bf16"]


if __name__ == "__main__":
    interpreter_main(CASES)
