"""The NF4 decode GEMV with multi-LoRA inside it: y = dequant(W) x + B[slot] (A[slot] x) per row, in one
launch (1..64 rows; each row's adapter slot from a device tensor, -1 for none; no host sync).

The GEMV splits K over SPLIT_K programs per column tile, as sloth_kernels.triton_nf4's does. The
shrink rides on it: a program of K split q multiplies the x tiles it loads for the base product by
A[s] of one slot s (for the rows that use s) and writes the fp32 partial [q, row, rank]; the last
program of each column tile to arrive sums the base partials and, once every shrink partial is
written, sums those, rounds them to the adapter's dtype (as the reference does) and adds the expand
B[s] @ shrunk for its columns in its epilogue. Every adapter is read once per launch.

Waiting on other programs inside one launch can deadlock unless the awaited ones are sure to run.
So programs take tickets (an atomic counter) in the order they start, and only programs with
tickets below the last K split's row do shrink work (the last split's x range included, by the
first row's programs). A column's last arrival comes after its last-split program took its ticket,
so every shrink program had started: they never wait themselves, so they finish. The interpreter,
which runs programs one by one in ticket order, meets the same order. All counters end at zero."""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from .nf4_format import NF4Weight
from .triton_lora import NO_END, _slice_block_n
from .triton_nf4 import (
    GEMV_MAX_ROWS,
    GemvConfig,
    _block_scales,
    _code_table,
    _nested_mode,
    _split_k,
    _weight_args,
    _weight_tile,
    arrival_counters,
    gemv_config_for,
    supports,
)
from .triton_nf4_decode import prmt_tables

MAX_FUSED_RANK = 128  # the stacked rank of a fused projection (slices x slot rank) the shrink tile holds


@triton.jit
def _shrink_store(acc, shrink_ptr, split, rm, mine, rr, M, RT: tl.constexpr):
    """Store one K split's shrink partial [BLOCK_M, BLOCK_RT] for the rows `mine` (its slot's)."""
    ptrs = shrink_ptr + split * M * RT + rm[:, None] * RT + rr[None, :]
    tl.store(ptrs, acc, mask=mine[:, None] & (rr < RT)[None, :])


@triton.jit
def _a_tile(a_ptr, ranks_ptr, slot, rr, k, k_ok, stride_as, stride_ar,
            R: tl.constexpr, RT: tl.constexpr, HAS_RANKS: tl.constexpr):
    """A[slot] rows rr (every slice's rank stacked) at columns k, zero past each slice's adapter rank."""
    r_ok = rr < RT
    if HAS_RANKS:  # the slot's padding past its adapter's rank is never read
        r_ok = r_ok & (rr % R < tl.load(ranks_ptr + slot))
    return tl.load(a_ptr + slot * stride_as + rr[:, None] * stride_ar + k[None, :],
                   mask=r_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _shrink_range(x_ptr, a_ptr, ranks_ptr, shrink_ptr, slot, slot_m, rm, split, M, stride_xm, stride_as, stride_ar,
                  K: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, BLOCKSIZE: tl.constexpr, KB: tl.constexpr,
                  BLOCK_RT: tl.constexpr, R: tl.constexpr, RT: tl.constexpr, HAS_RANKS: tl.constexpr,
                  IEEE: tl.constexpr):
    """The shrink of one slot over K split `split`'s x range, loading x itself (programs whose own
    range this is not, or a second slot of their own range): the work the main loop does in passing.
    A slot no row uses (one past the last included) costs nothing."""
    mine = slot_m == slot
    if tl.max(mine.to(tl.int32), axis=0) > 0:
        num_blocks: tl.constexpr = K // BLOCKSIZE
        kk = tl.arange(0, KB * BLOCKSIZE)
        rr = tl.arange(0, BLOCK_RT)
        dtype = a_ptr.dtype.element_ty
        acc = tl.zeros((rm.shape[0], BLOCK_RT), dtype=tl.float32)
        for step in range(0, BLOCKS_PER_SPLIT, KB):
            first = split * BLOCKS_PER_SPLIT + step
            left = tl.minimum(BLOCKS_PER_SPLIT - step, num_blocks - first)
            k = first * BLOCKSIZE + kk
            k_ok = kk < left * BLOCKSIZE
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mine[:, None] & k_ok[None, :], other=0.0)
            a = _a_tile(a_ptr, ranks_ptr, slot, rr, k, k_ok, stride_as, stride_ar, R, RT, HAS_RANKS)
            if IEEE:
                acc = tl.dot(xs.to(dtype), tl.trans(a), acc, input_precision="ieee")
            else:
                acc = tl.dot(xs.to(dtype), tl.trans(a), acc)
        _shrink_store(acc, shrink_ptr, split, rm, mine, rr, M, RT)


@triton.jit
def _expand(shrink_ptr, b_ptr, ranks_ptr, slot_m, rm, rn, n0, M, N, NUM_SLOTS: tl.constexpr, stride_bs, stride_bn,
            SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, R: tl.constexpr, RT: tl.constexpr,
            END0: tl.constexpr, END1: tl.constexpr, HAS_RANKS: tl.constexpr, IEEE: tl.constexpr):
    """[BLOCK_N, BLOCK_M] fp32: B[slot] @ shrunk for each row's slot (0 for rows without one), the
    shrunk sums read for this column tile's slice and rounded to the adapter's dtype first."""
    # Columns [0, END0) are slice 0, [END0, END1) slice 1, the rest slice 2 (tiles never straddle).
    r_off = ((n0 >= END0).to(tl.int32) + (n0 >= END1).to(tl.int32)) * R
    rr = tl.arange(0, BLOCK_R)
    on = slot_m >= 0
    mask = on[:, None] & (rr < R)[None, :]
    shrunk = tl.zeros((rm.shape[0], BLOCK_R), dtype=tl.float32)
    for q in range(SPLIT_K):
        shrunk += tl.load(shrink_ptr + q * M * RT + rm[:, None] * RT + r_off + rr[None, :], mask=mask, other=0.0,
                          cache_modifier=".cg")
    dtype = b_ptr.dtype.element_ty
    shrunk = shrunk.to(dtype)
    delta = tl.zeros((rn.shape[0], rm.shape[0]), dtype=tl.float32)
    for s in range(NUM_SLOTS):
        mine = slot_m == s
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            r_ok = rr < R
            if HAS_RANKS:
                r_ok = r_ok & (rr < tl.load(ranks_ptr + s))
            b = tl.load(b_ptr + s * stride_bs + rn[:, None] * stride_bn + rr[None, :],
                        mask=(rn < N)[:, None] & r_ok[None, :], other=0.0)
            rows = tl.where(mine[:, None], shrunk, tl.zeros_like(shrunk))
            if IEEE:
                delta = tl.dot(b, tl.trans(rows), delta, input_precision="ieee")
            else:
                delta = tl.dot(b, tl.trans(rows), delta)
    return delta


@triton.jit(do_not_specialize=["M"])
def _gemv_lora_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, part_ptr, lock_ptr,
    a_ptr, b_ptr, slots_ptr, ranks_ptr, shrink_ptr,
    M, N, stride_xm, stride_om, stride_on, stride_as, stride_ar, stride_bs, stride_bn,
    t0, t1, t2, t3, t4, t5, t6, t7,
    K: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, SPLIT_K: tl.constexpr, TILES_N: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, KB: tl.constexpr, USE_PRMT: tl.constexpr, EVEN_N: tl.constexpr,
    R: tl.constexpr, RT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RT: tl.constexpr,
    END0: tl.constexpr, END1: tl.constexpr, HAS_RANKS: tl.constexpr, IEEE: tl.constexpr,
):
    # Counters after the TILES_N column counters: tickets, shrink programs done, columns done.
    tickets = lock_ptr + TILES_N
    shrunk_done = lock_ptr + TILES_N + 1
    columns_done = lock_ptr + TILES_N + 2
    ticket = tl.atomic_add(tickets, 1)
    if ticket == TILES_N * SPLIT_K - 1:  # every program has its ticket: ready for the next launch
        tl.atomic_xchg(tickets, 0)
    pid_k = ticket // TILES_N
    pid_n = ticket % TILES_N
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    num_blocks: tl.constexpr = K // BLOCKSIZE
    EVEN_K: tl.constexpr = (BLOCKS_PER_SPLIT % KB == 0) and (num_blocks == BLOCKS_PER_SPLIT * SPLIT_K)
    MASKED: tl.constexpr = not (EVEN_K and EVEN_N)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    kb = tl.arange(0, KB)
    kk = tl.arange(0, KB * BLOCKSIZE)
    rr = tl.arange(0, BLOCK_RT)
    n_mask = rn < N
    m_mask = rm < M
    slot_m = tl.load(slots_ptr + rm, mask=m_mask, other=-1)
    shrink_row = pid_k < SPLIT_K - 1
    # This program's own slot (column tile pid_n shrinks slot pid_n over its own x range), if used.
    own = slot_m == pid_n
    has_own = shrink_row & (pid_n < NUM_SLOTS) & (tl.max(own.to(tl.int32), axis=0) > 0)
    adapter_dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, BLOCK_RT), dtype=tl.float32)
    for step in range(0, BLOCKS_PER_SPLIT, KB):
        first = pid_k * BLOCKS_PER_SPLIT + step
        left = tl.minimum(BLOCKS_PER_SPLIT - step, num_blocks - first)
        mask = n_mask[:, None] & (kb < left)[None, :]
        s = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rn[:, None] * num_blocks + first + kb[None, :],
                          mask, NESTED, BLOCKSIZE2, MASKED)
        w = _weight_tile(w_ptr, rn, first, mask, s, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7,
                         K, KB, BLOCKSIZE, USE_PRMT, DTYPE, MASKED)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + first * BLOCKSIZE + kk[None, :]
        if EVEN_K:
            xs = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            xs = tl.load(x_ptrs, mask=m_mask[:, None] & (kk < left * BLOCKSIZE)[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(xs.to(DTYPE)), acc)
        if has_own:  # the shrink on the x tile just loaded
            k = first * BLOCKSIZE + kk
            a = _a_tile(a_ptr, ranks_ptr, pid_n, rr, k, kk < left * BLOCKSIZE, stride_as, stride_ar, R, RT, HAS_RANKS)
            xs_own = tl.where(own[:, None], xs, tl.zeros_like(xs)).to(adapter_dtype)
            if IEEE:
                acc_s = tl.dot(xs_own, tl.trans(a), acc_s, input_precision="ieee")
            else:
                acc_s = tl.dot(xs_own, tl.trans(a), acc_s)
    if shrink_row:
        if has_own:
            _shrink_store(acc_s, shrink_ptr, pid_k, rm, own, rr, M, RT)
        # More slots than column tiles: this range's other slots of this column.
        # (Loop bounds from kernel arguments only: the interpreter takes no tensor as a range bound.)
        for j in range(TILES_N, NUM_SLOTS, TILES_N):
            _shrink_range(x_ptr, a_ptr, ranks_ptr, shrink_ptr, j + pid_n, slot_m, rm, pid_k, M, stride_xm, stride_as,
                          stride_ar, K, BLOCKS_PER_SPLIT, BLOCKSIZE, KB, BLOCK_RT, R, RT, HAS_RANKS, IEEE)
        if pid_k == 0:  # the last split's range (its programs do no shrink work: see the docstring)
            for j in range(0, NUM_SLOTS, TILES_N):
                _shrink_range(x_ptr, a_ptr, ranks_ptr, shrink_ptr, j + TILES_N - 1 - pid_n, slot_m, rm, SPLIT_K - 1, M, stride_xm,
                              stride_as, stride_ar, K, BLOCKS_PER_SPLIT, BLOCKSIZE, KB, BLOCK_RT, R, RT, HAS_RANKS,
                              IEEE)
        tl.debug_barrier()
        tl.atomic_add(shrunk_done, 1)  # acq_rel: orders this program's shrink stores before it
    # Split-K: partials to [SPLIT_K, N, M]; the last program of this column tile sums them.
    out_mask = n_mask[:, None] & m_mask[None, :]
    part_ptrs = part_ptr + rn[:, None] * M + rm[None, :]
    tl.store(part_ptrs + pid_k * N * M, acc, mask=out_mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(lock_ptr + pid_n, 1)
    if arrived == SPLIT_K - 1:
        total = tl.zeros(acc.shape, dtype=tl.float32)
        for q in range(SPLIT_K):
            total += tl.load(part_ptrs + q * N * M, mask=out_mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(lock_ptr + pid_n, 0)
        out_dtype = out_ptr.dtype.element_ty
        y = total.to(out_dtype)  # the base product, rounded as the unfused GEMV stores it
        done = tl.atomic_add(shrunk_done, 0)
        while done < (SPLIT_K - 1) * TILES_N:  # the shrink programs all started (see the docstring)
            done = tl.atomic_add(shrunk_done, 0)
        delta = _expand(shrink_ptr, b_ptr, ranks_ptr, slot_m, rm, rn, pid_n * BLOCK_N, M, N, NUM_SLOTS,
                        stride_bs, stride_bn, SPLIT_K, BLOCK_R, R, RT, END0, END1, HAS_RANKS, IEEE)
        # As the reference: the delta rounded to y's dtype, then added; rows without a slot keep y.
        with_lora = (y.to(tl.float32) + delta.to(out_dtype).to(tl.float32)).to(out_dtype)
        y = tl.where((slot_m >= 0)[None, :], with_lora, y)
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None] * stride_on, y, mask=out_mask)
        if tl.atomic_add(columns_done, 1) == TILES_N - 1:  # the last reader of the shrink counter
            tl.atomic_xchg(shrunk_done, 0)
            tl.atomic_xchg(columns_done, 0)


def fusable(x: torch.Tensor, w: NF4Weight, a: torch.Tensor, slices: list[int]) -> bool:
    """Whether one launch can take this product: a decode batch (1..GEMV_MAX_ROWS rows) the NF4
    kernels support, at least two absmax blocks along K (the shrink needs two K splits), a stacked
    rank of at most MAX_FUSED_RANK, and column tiles that never straddle two slices."""
    m = x.reshape(-1, x.shape[-1]).shape[0]
    return (1 <= m <= GEMV_MAX_ROWS and supports(x, w) and w.shape[1] // w.blocksize >= 2 and 1 <= len(slices) <= 3
            and sum(slices) == w.shape[0] and a.shape[1] <= MAX_FUSED_RANK and a.dtype == x.dtype
            and _slice_block_n(slices, 64) >= 16)


def launch_config(m: int, w: NF4Weight, slices: list[int], device: torch.device,
                  gemv: GemvConfig | None = None) -> GemvConfig:
    """The GEMV configuration the fused launch runs (`gemv`, else the tuned one for the shape): the
    tensor-core kernel, column tiles that never straddle two slices, and an explicit K split of at
    least two (the shrink needs one split row besides the last). nf4_matmul given this configuration
    computes the same base product bit for bit."""
    n, k = w.shape
    cfg = gemv or gemv_config_for(m, n, k)
    block_n = _slice_block_n(slices, cfg.block_n)
    num_blocks = k // w.blocksize
    split = max(2, _split_k(replace(cfg, block_n=block_n), triton.cdiv(n, block_n), num_blocks, device))
    split = triton.cdiv(num_blocks, triton.cdiv(num_blocks, min(split, num_blocks)))  # no empty splits
    return replace(cfg, block_n=block_n, split_k=split, cuda_cores=False)


def nf4_lora_matmul(
    x: torch.Tensor, w: NF4Weight, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
    slices: list[int] | None = None, ranks: torch.Tensor | None = None, out: torch.Tensor | None = None,
    gemv: GemvConfig | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T, plus (x @ A_i[slot].T) @ B_i[slot].T on slice i's columns for rows with a
    slot, -> [M, N] in x.dtype (into `out`, any strides, when given); one launch. `a` [num_slots,
    len(slices) * rank, K] and `b` [num_slots, N, rank] as sloth_kernels.lora.add_lora takes them
    (scale folded into b), `ranks` each slot's adapter rank. Check `fusable` first."""
    m, k = x.shape
    n = w.shape[0]
    slices = slices or [n]
    num_slots, rank_total, _ = a.shape
    rank = rank_total // len(slices)
    if x.stride(1) != 1:
        x = x.contiguous()
    if a.stride(-1) != 1 or b.stride(-1) != 1:
        a, b = a.contiguous(), b.contiguous()
    if slots.dtype != torch.int32:
        slots = slots.int()
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = launch_config(m, w, slices, x.device, gemv)
    block_n, split = cfg.block_n, cfg.split_k
    tiles_n = triton.cdiv(n, block_n)
    per_split = triton.cdiv(k // w.blocksize, split)
    use_prmt = cfg.use_prmt and x.is_cuda and x.dtype != torch.float32
    tables = prmt_tables(x.dtype) if use_prmt else (0,) * 8
    part = torch.empty((split, n, m), dtype=torch.float32, device=x.device)
    shrink = torch.empty((split, m, rank_total), dtype=torch.float32, device=x.device)  # rows with a slot only
    locks = arrival_counters(x.device, tiles_n + 3)
    ends = [sum(slices[: i + 1]) for i in range(len(slices) - 1)] + [NO_END, NO_END]
    has_ranks = ranks is not None
    _gemv_lora_kernel[(tiles_n * split,)](
        x, *_weight_args(w), _code_table(x.device, torch.float32), out, part, locks,
        a, b, slots, ranks if ranks is not None else slots, shrink,
        m, n, x.stride(0), out.stride(0), out.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        *tables,
        K=k, NUM_SLOTS=num_slots, BLOCKS_PER_SPLIT=per_split, NESTED=_nested_mode(w), BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.state2_blocksize,
        SPLIT_K=split, TILES_N=tiles_n, BLOCK_N=block_n, BLOCK_M=max(16, triton.next_power_of_2(m)), KB=cfg.kb,
        USE_PRMT=use_prmt, EVEN_N=n % block_n == 0, R=rank, RT=rank_total,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), BLOCK_RT=max(16, triton.next_power_of_2(rank_total)),
        END0=ends[0], END1=ends[1], HAS_RANKS=has_ranks, IEEE=a.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
