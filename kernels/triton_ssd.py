"""Triton Mamba-2 SSD (see `ssd.ssd_update_ref` / `ssd.ssd_chunk_scan_ref`). The decode update is one
program per (row, head, head-dim block) holding its [P, N] state tile. The chunked scan is one program
per (sequence, head, head-dim block) that walks its sequence in chunks of BLOCK_L tokens with the state
in registers: per chunk three dots (C B^T, its decayed mask times x, C times the carried state) and one
for the state's update, so a prompt chunk of any length is one launch and its state never leaves the
chip until the end. Dots are IEEE float32, as the reference (and transformers' torch path) computes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ssm_params import SSMParams


def _pow2(n: int, floor: int = 16) -> int:
    """A power of two >= n and >= floor (tl.dot needs every dim >= 16)."""
    return max(floor, 1 << max(n - 1, 0).bit_length())


@triton.jit
def _dt_of(raw, bias, dt_min, dt_max):
    """softplus(raw + bias) in float32, linear past 20 like torch's, clamped to the limits."""
    v = raw.to(tl.float32) + bias
    v = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))
    return tl.minimum(tl.maximum(v, dt_min), dt_max)


@triton.jit
def _update_kernel(
    x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, state_ptr, slot_ptr, y_ptr,
    dt_min, dt_max, head_dim, state_size, heads_per_group,
    sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, ss_s, ss_h, ss_p, sy_t, sy_h,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < head_dim, n < state_size
    slot = tl.load(slot_ptr + t).to(tl.int64)
    live = slot >= 0  # a padding row (CUDA graph batch) touches no state and outputs zeros
    x = tl.load(x_ptr + t * sx_t + h * sx_h + p, mask=p_ok, other=0.0).to(tl.float32)
    g = h // heads_per_group
    dt = _dt_of(tl.load(dt_ptr + t * sdt_t + h), tl.load(bias_ptr + h).to(tl.float32), dt_min, dt_max)
    decay = tl.exp(dt * tl.load(a_ptr + h).to(tl.float32))
    bv = tl.load(b_ptr + t * sb_t + g * sb_g + n, mask=n_ok, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + t * sc_t + g * sc_g + n, mask=n_ok, other=0.0).to(tl.float32)
    tile = state_ptr + slot * ss_s + h * ss_h + p[:, None] * ss_p + n[None, :]
    mask = p_ok[:, None] & n_ok[None, :] & live
    state = tl.load(tile, mask=mask, other=0.0).to(tl.float32)
    state = state * decay + (dt * x)[:, None] * bv[None, :]
    tl.store(tile, state.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(state * cv[None, :], axis=1) + tl.load(d_ptr + h).to(tl.float32) * x
    y = tl.where(live, y, 0.0)
    tl.store(y_ptr + t * sy_t + h * sy_h + p, y.to(y_ptr.dtype.element_ty), mask=p_ok)


def ssd_update_triton(x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, params: SSMParams,
                      ssm_state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    num_tokens, num_heads, head_dim = x.shape
    state_size = B.shape[-1]
    _check(x, dt, B, C, ssm_state)
    y = torch.empty_like(x)
    block_p = min(_pow2(head_dim), 64)
    grid = (num_tokens, num_heads, triton.cdiv(head_dim, block_p))
    _update_kernel[grid](
        x, dt, B, C, params.A, params.D, params.dt_bias, ssm_state, slots, y,
        params.dt_min, params.dt_max, head_dim, state_size, num_heads // B.shape[1],
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0), y.stride(1),
        BLOCK_P=block_p, BLOCK_N=_pow2(state_size),
    )
    return y


@triton.jit
def _scan_kernel(
    x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, state_ptr, qsl_ptr, slot_ptr, init_ptr, y_ptr,
    dt_min, dt_max, head_dim, state_size, heads_per_group,
    sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, ss_s, ss_h, ss_p, sy_t, sy_h,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    lrow = tl.arange(0, BLOCK_L)
    p_ok, n_ok = p < head_dim, n < state_size
    start = tl.load(qsl_ptr + b)
    length = tl.load(qsl_ptr + b + 1) - start
    slot = tl.load(slot_ptr + b).to(tl.int64)
    g = h // heads_per_group
    a = tl.load(a_ptr + h).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32)
    skip = tl.load(d_ptr + h).to(tl.float32)
    tile = state_ptr + slot * ss_s + h * ss_h + p[:, None] * ss_p + n[None, :]
    tile_mask = p_ok[:, None] & n_ok[None, :]
    initial = tl.load(init_ptr + b) != 0
    state = tl.load(tile, mask=tile_mask & initial, other=0.0).to(tl.float32)  # [P, N]
    causal = lrow[:, None] >= lrow[None, :]
    for c0 in range(0, length, BLOCK_L):
        rows = c0 + lrow
        ok = rows < length
        tok = (start + rows).to(tl.int64)
        # dt is 0 past the sequence's end: those rows neither decay nor feed the state
        dt = tl.where(ok, _dt_of(tl.load(dt_ptr + tok * sdt_t + h, mask=ok, other=0.0), bias, dt_min, dt_max), 0.0)
        cum = tl.cumsum(dt * a, axis=0)  # [L]: log decay from the chunk start
        x = tl.load(x_ptr + tok[:, None] * sx_t + h * sx_h + p[None, :],
                    mask=ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
        bm = tl.load(b_ptr + tok[:, None] * sb_t + g * sb_g + n[None, :],
                     mask=ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        cm = tl.load(c_ptr + tok[:, None] * sc_t + g * sc_g + n[None, :],
                     mask=ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        # within the chunk: (C B^T)[i, j] exp(cum[i] - cum[j]) dt[j] for j <= i (masked before exp)
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        scores = tl.dot(cm, tl.trans(bm), input_precision="ieee") * decay * dt[None, :]
        y = tl.dot(scores, x, input_precision="ieee")
        y += tl.dot(cm, tl.trans(state), input_precision="ieee") * tl.exp(cum)[:, None]
        y += skip * x
        tl.store(y_ptr + tok[:, None] * sy_t + h * sy_h + p[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=ok[:, None] & p_ok[None, :])
        total = tl.sum(dt * a, axis=0)
        to_end = tl.exp(total - cum) * dt  # [L]: each input's decay to the chunk end (0 past the end)
        state = state * tl.exp(total) + tl.dot(tl.trans(x * to_end[:, None]), bm, input_precision="ieee")
    tl.store(tile, state.to(state_ptr.dtype.element_ty), mask=tile_mask)


def ssd_chunk_scan_triton(x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          params: SSMParams, ssm_state: torch.Tensor, query_start_loc: torch.Tensor,
                          slots: torch.Tensor, has_initial: torch.Tensor, block_l: int = 32) -> torch.Tensor:
    num_heads, head_dim = x.shape[1:]
    state_size = B.shape[-1]
    _check(x, dt, B, C, ssm_state)
    y = torch.empty_like(x)
    block_p = min(_pow2(head_dim), 32)
    grid = (slots.shape[0], num_heads, triton.cdiv(head_dim, block_p))
    _scan_kernel[grid](
        x, dt, B, C, params.A, params.D, params.dt_bias, ssm_state, query_start_loc, slots, has_initial, y,
        params.dt_min, params.dt_max, head_dim, state_size, num_heads // B.shape[1],
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0), y.stride(1),
        BLOCK_L=block_l, BLOCK_P=block_p, BLOCK_N=_pow2(state_size),
    )
    return y


def _check(x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, ssm_state: torch.Tensor) -> None:
    """Unit strides where the kernels index with arange (strided views of in_proj's output are fine)."""
    assert x.stride(2) == 1 and dt.stride(1) == 1 and B.stride(2) == 1 and C.stride(2) == 1, "unit inner strides"
    assert ssm_state.stride(3) == 1, "the state's last dim must be contiguous"
    assert x.shape[1] % B.shape[1] == 0 and B.shape == C.shape, f"{x.shape[1]} heads over {B.shape[1]} groups"
