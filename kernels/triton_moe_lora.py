"""Expert LoRA in Triton over the assignments the grouped MoE GEMMs already sorted by expert
(`triton_moe.align_by_expert`'s rows and block experts): for one projection, one shrink launch
(program: row block x adapter slot) multiplies the block's rows of that slot by A[slot, expert],
one expand launch (row block x column tile x slot) multiplies the result by B[slot, expert] into a
delta that the base GEMM adds to its projection before the activation (gate|up) or the routing
weight (down). Programs whose slot no row of their block uses, or whose slot has no LoRA here,
return at once; no host sync, static shapes: CUDA graphs capture it (and the number of rows, which
follows the batch, is not specialized on: no recompiles as batches change).
Reference: sloth_kernels.moe_lora.moe_lora_delta_ref."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_lora import ExpertLoRA


@triton.jit
def _rows_of_slot(rows_ptr, block_expert_ptr, slots_ptr, ranks_ptr, pid_m, slot, num_rows, top_k,
                  BLOCK_M: tl.constexpr):
    """(expert, rows, mine, rank) of one row block for one slot; mine: the rows whose token uses it."""
    expert = tl.load(block_expert_ptr + pid_m)
    rank = tl.load(ranks_ptr + slot)
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = (rows < num_rows) & (expert >= 0) & (rank > 0)
    token_slot = tl.load(slots_ptr + tl.where(row_ok, rows // top_k, 0), mask=row_ok, other=-1)
    return expert, rows, row_ok & (token_slot == slot), rank


@triton.jit(do_not_specialize=["num_rows"])
def _shrink(x_ptr, a_ptr, out_ptr, rows_ptr, block_expert_ptr, slots_ptr, ranks_ptr, K: tl.constexpr, num_rows, top_k,
            a_row_div, stride_xm, stride_as, stride_ae, stride_ar, stride_om, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[row, :rank] = x[row // a_row_div] @ A[slot, expert].T, rounded to A's dtype."""
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    expert, rows, mine, rank = _rows_of_slot(rows_ptr, block_expert_ptr, slots_ptr, ranks_ptr, pid_m, slot,
                                             num_rows, top_k, BLOCK_M)
    if tl.max(mine.to(tl.int32), axis=0) == 0:
        return
    x_rows = tl.where(mine, rows // a_row_div, 0).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < rank
    a_base = a_ptr + slot.to(tl.int64) * stride_as + expert.to(tl.int64) * stride_ae
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xs = tl.load(x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :], mask=mine[:, None] & k_ok[None, :],
                     other=0.0)
        a = tl.load(a_base + rr[None, :] * stride_ar + offs_k[:, None], mask=k_ok[:, None] & r_ok[None, :],
                    other=0.0)
        acc += tl.dot(xs.to(a.dtype), a, input_precision=PRECISION)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + rr[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mine[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["num_rows"])
def _expand(shrunk_ptr, b_ptr, delta_ptr, rows_ptr, block_expert_ptr, slots_ptr, ranks_ptr, N, num_rows, top_k,
            stride_sm, stride_bs, stride_be, stride_bn, stride_dm, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """delta[row, n] = shrunk[row, :rank] @ B[slot, expert][n, :rank], rounded to delta's dtype."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.program_id(2)
    expert, rows, mine, rank = _rows_of_slot(rows_ptr, block_expert_ptr, slots_ptr, ranks_ptr, pid_m, slot,
                                             num_rows, top_k, BLOCK_M)
    if tl.max(mine.to(tl.int32), axis=0) == 0:
        return
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < rank
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    row_off = rows.to(tl.int64)[:, None]
    s = tl.load(shrunk_ptr + row_off * stride_sm + rr[None, :], mask=mine[:, None] & r_ok[None, :], other=0.0)
    b_base = b_ptr + slot.to(tl.int64) * stride_bs + expert.to(tl.int64) * stride_be
    b = tl.load(b_base + offs_n[None, :] * stride_bn + rr[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    acc = tl.dot(s, b, input_precision=PRECISION)
    tl.store(delta_ptr + row_off * stride_dm + offs_n[None, :], acc.to(delta_ptr.dtype.element_ty),
             mask=mine[:, None] & n_ok[None, :])


def grouped_lora_delta(inputs: torch.Tensor, a_row_div: int, top_k: int, num_rows: int, rows: torch.Tensor,
                       block_expert: torch.Tensor, block_m: int, slots: torch.Tensor,
                       lora: ExpertLoRA) -> torch.Tensor:
    """[num_rows, out]: for assignment row r (token r // top_k, input row r // a_row_div) of an
    adapter slot, B[slot, e] A[slot, e] inputs[r // a_row_div]; zeros for rows without one."""
    num_slots, _, rank, k = lora.a.shape
    n_out = lora.b.shape[2]
    assert lora.a.stride(3) == 1 and lora.b.stride(3) == 1 and inputs.stride(1) == 1
    slots = slots if slots.dtype == torch.int32 else slots.int()
    block_r = max(16, triton.next_power_of_2(rank))
    precision = "ieee" if inputs.dtype == torch.float32 else "tf32"
    shrunk = torch.empty(num_rows, rank, dtype=lora.a.dtype, device=inputs.device)
    num_blocks = block_expert.numel()
    _shrink[(num_blocks, num_slots)](
        inputs, lora.a, shrunk, rows, block_expert, slots, lora.ranks, k, num_rows, top_k, a_row_div,
        inputs.stride(0), lora.a.stride(0), lora.a.stride(1), lora.a.stride(2), shrunk.stride(0),
        PRECISION=precision, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64)
    delta = torch.zeros(num_rows, n_out, dtype=inputs.dtype, device=inputs.device)
    block_n = 64
    _expand[(num_blocks, triton.cdiv(n_out, block_n), num_slots)](
        shrunk, lora.b, delta, rows, block_expert, slots, lora.ranks, n_out, num_rows, top_k,
        shrunk.stride(0), lora.b.stride(0), lora.b.stride(1), lora.b.stride(2), delta.stride(0),
        PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
    return delta
