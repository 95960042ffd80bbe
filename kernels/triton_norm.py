"""Triton RMSNorm, optionally fused with the residual add before it. Same rounding order as
`norm.rms_norm_ref`: sum in fp32 rounded to the activation dtype, normalise in fp32, cast, then scale;
with SCALE_FP32 as `norm.gemma_rms_norm_ref`: a float32 scale applied before the one cast."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    """Smallest power of two >= n (triton.next_power_of_2 costs microseconds per call on the host)."""
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    num_rows, num_heads, n_cols, eps,
    stride_xt, stride_xh, stride_rt, stride_st,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_FP32: tl.constexpr,
):
    # Row r is (token r // num_heads, head r % num_heads): 2-D [T, N] inputs have num_heads == 1,
    # per-head q/k norm reads [T, H, D] views of the fused qkv output without a copy.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    tok = (rows // num_heads).to(tl.int64)
    head = rows % num_heads
    x_off = tok * stride_xt + head * stride_xh
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (tok * stride_rt)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + (tok * stride_st)[:, None] + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) / n_cols
    y = xf * tl.rsqrt(var + eps)[:, None]
    if not SCALE_FP32:  # Llama rounds the normalised value before scaling; Gemma does not
        y = y.to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    out = y * w.to(tl.float32)[None, :]
    out_off = rows.to(tl.int64) * n_cols
    tl.store(out_ptr + out_off[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, heads, token stride, head stride) with a unit last stride, avoiding copies."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:
        return x, x.shape[1], x.stride(0), x.stride(1)
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x, 1, x.stride(0), 0


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, scale_fp32: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    shape = x.shape
    n = shape[-1]
    x2, heads, stride_xt, stride_xh = _as_rows(x if residual is None else x.reshape(-1, n))
    num_rows = x2.numel() // n
    out_dtype = x.dtype if scale_fp32 else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(shape, dtype=out_dtype, device=x.device)
    total = None
    res2 = x2
    if residual is not None:
        assert residual.shape == shape, f"residual shape {tuple(residual.shape)} != x shape {tuple(shape)}"
        res2 = residual.reshape(-1, n)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        total = torch.empty(shape, dtype=x.dtype, device=x.device)
    block_n = _pow2(n)
    block_r = max(1, min(64, 2048 // block_n))
    num_warps = 8 if block_n >= 4096 else 4 if block_n * block_r >= 1024 else 2
    grid = (_cdiv(num_rows, block_r),)
    _rms_norm_kernel[grid](
        x2, res2, weight, out, x2 if total is None else total,
        num_rows, heads, n, eps,
        stride_xt, stride_xh, res2.stride(0), n,
        HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_N=block_n, SCALE_FP32=scale_fp32,
        num_warps=num_warps,
    )
    return out, total


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, scale_fp32: bool = False) -> torch.Tensor:
    return _launch(x, None, weight, eps, scale_fp32)[0]


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, scale_fp32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    out, total = _launch(x, residual, weight, eps, scale_fp32)
    return out, x if total is None else total
