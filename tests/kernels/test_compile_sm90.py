"""Every Triton kernel, at the shapes the dispatch code launches it with for Llama-3-8B, Qwen3.5-9B,
gpt-oss-20b (and a Mamba-2 layer), compiles for sm_90 within what an H100 / H200 block may use: shared
memory up to 227 KB, and no more stack (spilled registers) than its budget. No GPU: Triton's own
ptxas compiles for the target (sloth_kernels.compile_check); bench/kernel_resources.py prints the
figures. The interpreter tests cannot see these limits (the chunked gated delta kernel passed them
all and then asked 263 KB on the H200)."""

from __future__ import annotations

import pytest

from bench.kernel_resources import STACK_BUDGET, cases, compile_case, stack_budget
from sloth_kernels.compile_check import SM90_SHARED_LIMIT, KernelResources, toolchain_problem

SKIP = toolchain_problem()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"cannot compile for sm_90 here: {SKIP}")


@pytest.mark.parametrize("name", list(cases()))
def test_kernels_fit_an_sm90_block(name: str) -> None:
    found = compile_case(cases()[name])
    assert found, f"case {name} launched no Triton kernel"
    problems = [p for r in found for p in r.problems(stack_limit=stack_budget(r.kernel))]
    assert not problems, "\n".join(problems)


def test_chunked_gated_delta_state_kernel_is_listed_at_qwen3_5_shapes() -> None:
    """The retiled chunked form is what the check compiles (not only the token-by-token kernel)."""
    kernels = {r.kernel: r for r in compile_case(cases()["gated_delta_qwen3_5_9b"])}
    assert {"_chunk_prep_kernel", "_chunk_state_kernel", "_gated_delta_kernel"} <= set(kernels)
    assert "BLOCK_K=128" in kernels["_chunk_state_kernel"].config


def test_problems_name_the_limits() -> None:
    """The check itself: a kernel past either limit is reported with its figures, one within is not."""
    big = KernelResources("_k", "BLOCK=128", SM90_SHARED_LIMIT + 1, 255, STACK_BUDGET + 8)
    assert [p.split(" needs")[0].split(" spills")[0] for p in big.problems(stack_limit=STACK_BUDGET)] == [
        "_k[BLOCK=128]", "_k[BLOCK=128]"]
    assert KernelResources("_k", "", SM90_SHARED_LIMIT, 64, 0).problems() == []
