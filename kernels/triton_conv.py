"""Triton causal depthwise convolution with per-sequence state (see `conv.causal_conv1d_ref`).
Two launches: one tile of [tokens x channels] per program for the output (every token of every
sequence in parallel, prefill or decode alike), then one program per (sequence, channel block)
writing the new state, after every read of the old one."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .state_batch import StateBatch


@triton.jit(do_not_specialize=["num_tokens"])
def _conv_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, out_ptr, qsl_ptr, slot_ptr, init_ptr, seq_ptr,
    num_tokens, dim, stride_x, stride_o, stride_ss, stride_sd,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_tokens
    col_ok = cols < dim
    seq = tl.load(seq_ptr + rows, mask=row_ok, other=0)
    start = tl.load(qsl_ptr + seq, mask=row_ok, other=0)
    slot = tl.load(slot_ptr + seq, mask=row_ok, other=0).to(tl.int64)
    initial = tl.load(init_ptr + seq, mask=row_ok, other=0) != 0
    local = rows - start
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        back = local - (K - 1) + k  # the input's index in the sequence; < 0: in the state
        in_x = back >= 0
        xv = tl.load(x_ptr + (start + back).to(tl.int64)[:, None] * stride_x + cols[None, :],
                     mask=(row_ok & in_x)[:, None] & col_ok[None, :], other=0.0)
        sv = tl.load(state_ptr + slot[:, None] * stride_ss + cols[None, :] * stride_sd + (K - 1 + back)[:, None],
                     mask=(row_ok & ~in_x & initial)[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols * K + k, mask=col_ok, other=0.0).to(tl.float32)
        acc += (xv.to(tl.float32) + sv.to(tl.float32)) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _state_kernel(
    x_ptr, state_ptr, qsl_ptr, slot_ptr, init_ptr,
    dim, stride_x, stride_ss, stride_sd,
    W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    start = tl.load(qsl_ptr + b)
    n = tl.load(qsl_ptr + b + 1) - start
    slot = tl.load(slot_ptr + b).to(tl.int64)
    initial = tl.load(init_ptr + b) != 0
    base = state_ptr + slot * stride_ss + cols * stride_sd
    # New entry j is input n - W + j: a token of this chunk, or (a chunk shorter than W) an old
    # entry further right, so entries are read before any is written.
    for j in tl.static_range(W):
        back = n - W + j
        xv = tl.load(x_ptr + (start + back).to(tl.int64) * stride_x + cols, mask=col_ok & (back >= 0), other=0.0)
        sv = tl.load(base + (W + back), mask=col_ok & (back < 0) & initial, other=0.0)
        tl.debug_barrier()
        tl.store(base + j, (xv.to(tl.float32) + sv.to(tl.float32)).to(state_ptr.dtype.element_ty), mask=col_ok)


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         conv_state: torch.Tensor, batch: StateBatch, silu: bool = False) -> torch.Tensor:
    num_tokens, dim = x.shape
    k = weight.shape[1]
    assert x.stride(1) == 1 and weight.is_contiguous() and conv_state.stride(2) == 1
    out = torch.empty_like(x)
    block_t, block_d = 16, min(256, triton.next_power_of_2(dim))
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d))
    _conv_kernel[grid](
        x, weight, bias if bias is not None else weight, conv_state, out, batch.query_start_loc, batch.slots,
        batch.has_initial, batch.token_seq, num_tokens, dim, x.stride(0), out.stride(0),
        conv_state.stride(0), conv_state.stride(1),
        K=k, HAS_BIAS=bias is not None, SILU=silu, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    num_seqs = batch.slots.shape[0]
    _state_kernel[(num_seqs, triton.cdiv(dim, block_d))](
        x, conv_state, batch.query_start_loc, batch.slots, batch.has_initial,
        dim, x.stride(0), conv_state.stride(0), conv_state.stride(1), W=k - 1, BLOCK_D=block_d,
    )
    return out
