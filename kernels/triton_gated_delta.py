"""Triton gated delta rule (see `gated_delta.gated_delta_rule_ref`): one program per (sequence, head,
block of value dims) holds its slice of the state [k_dim, BLOCK_V] in registers and walks the
sequence's tokens, so a decode step reads and writes each state once and a prompt chunk continues
from the state its previous chunk left. q and k are normalized before (in float32)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gated_delta import normalize_qk
from kernels.state_batch import StateBatch


@triton.jit
def _gated_delta_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, state_ptr, out_ptr, qsl_ptr, slot_ptr, init_ptr,
    heads, dk, dv, stride_qt, stride_qh, stride_vt, stride_vh, stride_gt, stride_ot, stride_oh,
    stride_ss, stride_sh, stride_sk,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    vcols = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    krows = tl.arange(0, BLOCK_K)
    k_ok = krows < dk
    v_ok = vcols < dv
    start = tl.load(qsl_ptr + seq)
    end = tl.load(qsl_ptr + seq + 1)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    initial = tl.load(init_ptr + seq) != 0
    s_ptrs = state_ptr + slot * stride_ss + head * stride_sh + krows[:, None] * stride_sk + vcols[None, :]
    tile = k_ok[:, None] & v_ok[None, :]
    s = tl.load(s_ptrs, mask=tile & initial, other=0.0).to(tl.float32)
    for t in range(start, end):  # token offsets fit int32: a step's tokens x heads x dims
        q = tl.load(q_ptr + t * stride_qt + head * stride_qh + krows, mask=k_ok, other=0.0)
        k = tl.load(k_ptr + t * stride_qt + head * stride_qh + krows, mask=k_ok, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + head * stride_vh + vcols, mask=v_ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + t * stride_gt + head).to(tl.float32)
        beta = tl.load(b_ptr + t * stride_gt + head).to(tl.float32)
        s = s * tl.exp(g)
        delta = beta * (v - tl.sum(s * k[:, None], axis=0))
        s = s + k[:, None] * delta[None, :]
        o = tl.sum(s * q[:, None], axis=0)
        tl.store(out_ptr + t * stride_ot + head * stride_oh + vcols, o.to(out_ptr.dtype.element_ty), mask=v_ok)
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=tile)


def gated_delta_rule_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                            beta: torch.Tensor, state: torch.Tensor, batch: StateBatch) -> torch.Tensor:
    num_tokens, heads, dk = q.shape
    dv = v.shape[-1]
    qn, kn = normalize_qk(q, k)  # contiguous float32 [T, H, dk]
    g, beta = g.float().contiguous(), beta.float().contiguous()
    assert v.stride(2) == 1 and state.is_contiguous()
    out = torch.empty(num_tokens, heads, dv, dtype=v.dtype, device=v.device)
    block_v = min(64, triton.next_power_of_2(dv))
    grid = (batch.slots.shape[0], heads, triton.cdiv(dv, block_v))
    _gated_delta_kernel[grid](
        qn, kn, v, g, beta, state, out, batch.query_start_loc, batch.slots, batch.has_initial,
        heads, dk, dv, qn.stride(0), qn.stride(1), v.stride(0), v.stride(1), g.stride(0), out.stride(0), out.stride(1),
        state.stride(0), state.stride(1), state.stride(2),
        BLOCK_K=triton.next_power_of_2(dk), BLOCK_V=block_v,
    )
    return out
