"""Triton rotary embedding (neox layout: rotate halves of the rotary dims; or interleaved, GPT-J's:
rotate neighbouring pairs), in place on q and k, one program per token.
Rounds like `rope.apply_rope_ref` (products and sums in the activation dtype, as transformers does)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    """Smallest power of two >= n (triton.next_power_of_2 costs microseconds per call on the host)."""
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (fp32) rounded to the activation dtype, kept in fp32. For bf16 the rounding (to nearest
    even) is done on the bits: a plain cast pair lets the compiler fuse the product into the next
    subtraction (one fma, one rounding), where torch rounds the product first."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(x_ptr, stride_h, num_heads, c, s, half, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  INTERLEAVED: tl.constexpr, FP32: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads < num_heads)[:, None] & (cols < half)[None, :]
    if INTERLEAVED:  # pair i is dims (2i, 2i + 1)
        p1 = x_ptr + heads[:, None] * stride_h + 2 * cols[None, :]
        p2 = p1 + 1
    else:  # pair i is dims (i, half + i)
        p1 = x_ptr + heads[:, None] * stride_h + cols[None, :]
        p2 = p1 + half
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if FP32:  # products and sums in float32, rounded once on the store (Cohere)
        a1 = x1 * c
        b1 = x2 * s
        a2 = x2 * c
        b2 = x1 * s
    else:  # each product and sum rounded to the activation dtype, as torch does op by op
        a1 = _rounded(x1 * c, dtype)
        b1 = _rounded(x2 * s, dtype)
        a2 = _rounded(x2 * c, dtype)
        b2 = _rounded(x1 * s, dtype)
    tl.store(p1, (a1 - b1).to(dtype), mask=mask)
    tl.store(p2, (a2 + b2).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
    num_q_heads, num_k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
    FP32: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < half
    dtype = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + pos * stride_cos + cols, mask=col_ok, other=0.0).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_cos + cols, mask=col_ok, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, c[None, :], s[None, :], half, BLOCK_HQ, BLOCK_HALF,
                  INTERLEAVED, FP32)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, c[None, :], s[None, :], half, BLOCK_HK, BLOCK_HALF,
                  INTERLEAVED, FP32)


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    interleaved: bool = False, fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hk, D] in place (strided views allowed) and returns them. Tables
    [rows, R / 2] rotate each head's first R dims; the others (partial rotary) are left as they are.
    `interleaved`: GPT-J's pairs (2i, 2i + 1) rather than neox's (i, R / 2 + i); `fp32`: products and
    sums kept in float32, rounded once (see rope.apply_rope_ref)."""
    assert q.dtype == k.dtype, f"q is {q.dtype} but k is {k.dtype}"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "q and k need a unit stride in head_dim"
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1, "cos and sin tables must share a layout"
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return q, k
    half = cos.shape[-1]
    assert 2 * half <= head_dim, f"rotary tables of width {half} for heads of {head_dim} dims"
    block_half = _pow2(half)
    block_hq = _pow2(num_q_heads)
    num_warps = 4 if block_hq * block_half >= 2048 else 2 if block_hq * block_half >= 512 else 1
    _rope_kernel[(num_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        num_q_heads, k.shape[1], half,
        BLOCK_HQ=block_hq, BLOCK_HK=_pow2(k.shape[1]), BLOCK_HALF=block_half, INTERLEAVED=interleaved,
        FP32=fp32,
        num_warps=num_warps,
    )
    return q, k
