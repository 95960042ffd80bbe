"""Triton RMSNorm (plain, fused with the residual add, per head on strided [T, H, D] views) equals the
PyTorch reference, rounding included: under TRITON_INTERPRET=1 on the CPU (in a subprocess, see
test_attention.py's harness) and on a GPU at Llama-3-8B shapes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_attention import DTYPES, check_interpreted, interpreter_main, rel_err, run_interpreted

from sloth_kernels.norm import (
    add_rms_norm,
    add_rms_norm_ref,
    gemma_add_rms_norm_ref,
    gemma_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)

# Same rounding order as the reference: only a few elements may differ by one ulp (rstd summed in
# another order); computing in another order would show ~1e-3 for bf16.
BOUND = 5e-4
EPS = 1e-6


def add_case(rows: int, cols: int, dtype: str, with_residual: bool = True, weight_fp32: bool = False) -> Callable:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_norm import add_rms_norm_triton

        dt = DTYPES[dtype]
        x = torch.randn(rows, cols).to(dt)
        residual = torch.randn(rows, cols).to(dt) if with_residual else None
        weight = (1 + 0.3 * torch.randn(cols)).to(torch.float32 if weight_fp32 else dt)
        x_before = x.clone()
        out, total = add_rms_norm_triton(x, residual, weight, EPS)
        ref_out, ref_total = add_rms_norm_ref(x, residual, weight, EPS)
        assert out.dtype == ref_out.dtype and torch.equal(x, x_before), "dtype or input changed"
        return max(rel_err(out, ref_out), rel_err(total, ref_total)), BOUND

    return run


def per_head_case(tokens: int, heads: int, head_dim: int, dtype: str) -> Callable:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_norm import rms_norm_triton

        dt = DTYPES[dtype]
        qkv = torch.randn(tokens, (heads + 2) * head_dim).to(dt)
        q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # strided, like the model's
        weight = (1 + 0.3 * torch.randn(head_dim)).to(dt)
        return rel_err(rms_norm_triton(q, weight, EPS), rms_norm_ref(q, weight, EPS)), BOUND

    return run


def gemma_case(rows: int, cols: int, dtype: str, with_residual: bool = True, heads: int = 0) -> Callable:
    """Gemma's rounding: a float32 scale (1 + w) applied before the one cast to the input dtype; rows
    of [T, H, D] strided views when `heads`."""

    def run() -> tuple[float, float]:
        from sloth_kernels.triton_norm import add_rms_norm_triton, rms_norm_triton

        dt = DTYPES[dtype]
        scale = 1 + 0.3 * torch.randn(cols)
        if heads:
            x = torch.randn(rows, (heads + 2) * cols).to(dt)[:, : heads * cols].view(rows, heads, cols)
            out, ref = rms_norm_triton(x, scale, EPS, scale_fp32=True), gemma_rms_norm_ref(x, scale, EPS)
            assert out.dtype == dt == ref.dtype
            return rel_err(out, ref), BOUND
        x = torch.randn(rows, cols).to(dt)
        residual = torch.randn(rows, cols).to(dt) if with_residual else None
        out, total = add_rms_norm_triton(x, residual, scale, EPS, scale_fp32=True)
        ref_out, ref_total = gemma_add_rms_norm_ref(x, residual, scale, EPS)
        assert out.dtype == dt == ref_out.dtype, "Gemma's norm returns the input dtype"
        # Rounding only once: the Llama order (round, then scale) would be ~1e-3 away in bf16.
        return max(rel_err(out, ref_out), rel_err(total, ref_total)), BOUND

    return run


CASES: dict[str, Callable] = {
    "add_fp32_odd": add_case(7, 96, "fp32"),
    "add_bf16_wide": add_case(3, 1000, "bf16"),
    "add_fp16": add_case(9, 200, "fp16"),
    "add_no_residual_bf16": add_case(5, 64, "bf16", with_residual=False),
    "add_bf16_fp32_weight": add_case(4, 48, "bf16", weight_fp32=True),
    "plain_2d_fp16_one_row": add_case(1, 4096, "fp16", with_residual=False),
    "per_head_d24_fp32": per_head_case(5, 6, 24, "fp32"),
    "per_head_d128_bf16": per_head_case(3, 7, 128, "bf16"),
    "per_head_d80_fp16": per_head_case(66, 3, 80, "fp16"),
    "gemma_add_bf16": gemma_case(5, 320, "bf16"),
    "gemma_no_residual_fp16": gemma_case(3, 96, "fp16", with_residual=False),
    "gemma_add_fp32_odd": gemma_case(7, 72, "fp32"),
    "gemma_per_head_d256_bf16": gemma_case(4, 256, "bf16", heads=3),
}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_rms_norm_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    check_interpreted(interpreted, name)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_add_rms_norm_gpu_llama3_shapes(tokens: int) -> None:
    torch.manual_seed(tokens)
    x, res = (torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = (1 + 0.3 * torch.randn(4096, device="cuda")).bfloat16()
    out, total = add_rms_norm(x, res, weight, 1e-5)
    ref_out, ref_total = add_rms_norm_ref(x, res, weight, 1e-5)
    assert torch.equal(total, ref_total)
    assert rel_err(out, ref_out) < BOUND


@pytest.mark.gpu
@gpu
def test_per_head_rms_norm_gpu_on_qkv_view() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(300, 48 * 128, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : 32 * 128].view(300, 32, 128)
    weight = (1 + 0.3 * torch.randn(128, device="cuda")).bfloat16()
    assert rel_err(rms_norm(q, weight, 1e-6), rms_norm_ref(q, weight, 1e-6)) < BOUND



@pytest.mark.gpu
@gpu
def test_gemma_rms_norm_gpu_gemma3_shapes() -> None:
    from sloth_kernels.norm import gemma_add_rms_norm, gemma_rms_norm

    torch.manual_seed(0)
    x, res = (torch.randn(300, 3840, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = 1 + 0.3 * torch.randn(3840, device="cuda")
    out, total = gemma_add_rms_norm(x, res, scale, 1e-6)
    ref_out, ref_total = gemma_add_rms_norm_ref(x, res, scale, 1e-6)
    assert torch.equal(total, ref_total) and out.dtype == torch.bfloat16
    assert rel_err(out, ref_out) < BOUND
    q = torch.randn(300, 24 * 256, device="cuda", dtype=torch.bfloat16)[:, : 16 * 256].view(300, 16, 256)
    head_scale = 1 + 0.3 * torch.randn(256, device="cuda")
    assert rel_err(gemma_rms_norm(q, head_scale, 1e-6), gemma_rms_norm_ref(q, head_scale, 1e-6)) < BOUND

if __name__ == "__main__":
    interpreter_main(CASES)
