"""Multi-LoRA in Triton for a batch whose tokens pick different adapters (per-token slot, -1 = none).

Two launches, no host sync, no memset. Shrink: program (slot, k-split, token tile) multiplies the
tile's tokens that use `slot` by a[slot] over its slice of K and writes fp32 partials
[split, token, rank]; the last split of each (slot, tile) to finish sums them into [token, rank]
(an arrival counter, as the NF4 GEMV's split-K does); expand: program (slot, column tile, token
tile) rounds that sum to the adapter dtype (as the reference does) and adds sum @ b[slot].T into y
for the same tokens. Each adapter is read once per launch whatever the number of its tokens, and programs whose
slot no token of their tile uses return at once, so the grid can span every slot."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_nf4 import arrival_counters


@triton.jit(do_not_specialize=["T"])
def _shrink_kernel(
    x_ptr, a_ptr, slots_ptr, ranks_ptr, part_ptr, out_ptr, lock_ptr,
    T, K, R, SLICE_R, stride_xt, stride_as, stride_ar, stride_pk, stride_pt, stride_ot,
    K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, IEEE: tl.constexpr, HAS_RANKS: tl.constexpr,
):
    slot = tl.program_id(0)
    split = tl.program_id(1)
    tile = tl.program_id(2)
    rt = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    mine = tl.load(slots_ptr + rt, mask=rt < T, other=-1) == slot
    if tl.max(mine.to(tl.int32), axis=0) == 0:
        return  # every split of this (slot, tile) returns here alike: its counter stays untouched
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    if HAS_RANKS:  # rows past the adapter's own rank are zero padding: never read them
        r_ok = r_ok & (rr % SLICE_R < tl.load(ranks_ptr + slot))
    rk = tl.arange(0, BLOCK_K)
    dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        k = split * K_PER_SPLIT + k0 + rk
        k_ok = (k0 + rk < K_PER_SPLIT) & (k < K)
        xs = tl.load(x_ptr + rt[:, None] * stride_xt + k[None, :], mask=mine[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + slot * stride_as + rr[:, None] * stride_ar + k[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(xs.to(dtype), tl.trans(a), acc, input_precision="ieee")
        else:
            acc = tl.dot(xs.to(dtype), tl.trans(a), acc)
    mask = mine[:, None] & r_ok[None, :]
    out_ptrs = out_ptr + rt[:, None] * stride_ot + rr[None, :]
    if SPLIT == 1:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        # The last split of this (slot, token tile) to arrive sums the partials once (the counter's
        # acq_rel atomic orders the others' stores before it) and resets the counter; the expand
        # then reads one [T, R] sum instead of every split's partials in each column tile.
        part_ptrs = part_ptr + rt[:, None] * stride_pt + rr[None, :]
        tl.store(part_ptrs + split * stride_pk, acc, mask=mask)
        tl.debug_barrier()
        lock = lock_ptr + slot * tl.num_programs(2) + tile
        arrived = tl.atomic_add(lock, 1)
        if arrived == SPLIT - 1:
            total = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(part_ptrs + s * stride_pk, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total, mask=mask)
            tl.atomic_xchg(lock, 0)


@triton.jit(do_not_specialize=["T"])
def _expand_kernel(
    shrunk_ptr, b_ptr, slots_ptr, ranks_ptr, y_ptr,
    T, N, R, stride_st, stride_bs, stride_bn, stride_yt, stride_yn,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr, END0: tl.constexpr, END1: tl.constexpr, HAS_RANKS: tl.constexpr,
):
    slot = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    rt = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    mine = tl.load(slots_ptr + rt, mask=rt < T, other=-1) == slot
    if tl.max(mine.to(tl.int32), axis=0) == 0:
        return
    # Fused projections: columns [0, END0) are slice 0, [END0, END1) slice 1, the rest slice 2; a
    # slice's rank-R sums sit at columns slice * R of the shrink's output (tiles never straddle).
    r_off = ((n0 >= END0).to(tl.int32) + (n0 >= END1).to(tl.int32)) * R
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    if HAS_RANKS:
        r_ok = r_ok & (rr < tl.load(ranks_ptr + slot))
    dtype = b_ptr.dtype.element_ty
    shrunk = tl.load(shrunk_ptr + rt[:, None] * stride_st + r_off + rr[None, :],
                     mask=mine[:, None] & r_ok[None, :], other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + rn[:, None] * stride_bn + rr[None, :],
                mask=(rn < N)[:, None] & r_ok[None, :], other=0.0)
    if IEEE:
        delta = tl.dot(shrunk.to(dtype), tl.trans(b), input_precision="ieee")
    else:
        delta = tl.dot(shrunk.to(dtype), tl.trans(b))
    y_ptrs = y_ptr + rt[:, None] * stride_yt + rn[None, :] * stride_yn
    y_mask = mine[:, None] & (rn < N)[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    # The reference rounds the delta to y's dtype before adding; so does this.
    tl.store(y_ptrs, (y.to(tl.float32) + delta.to(y_ptr.dtype.element_ty).to(tl.float32)).to(y_ptr.dtype.element_ty),
             mask=y_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


# The shrink splits K over programs until about SPLIT_PROGRAMS_PER_SM programs per SM run, at most
# MAX_SPLIT ways: the last split of a (slot, token tile) to finish sums every split's partial alone,
# so many splits make that one program's serial reduction the kernel's length. On the H200 at 8B
# shapes (bench/results/lora-sweep-h200.md) 16 was within 10% of the best split nearly everywhere,
# where 32 (the old cap) made q|k|v at 64 tokens 5x slower (54 vs 11 µs).
SPLIT_PROGRAMS_PER_SM = 2
MAX_SPLIT = 16


def choose_split(k: int, block_k: int, programs: int, device: torch.device) -> int:
    """K splits of the shrink for `programs` (slot, token tile) pairs: a power of two, so that prompts of
    many lengths share a few compiled variants (the split is a compile-time constant)."""
    split = max(1, min(triton.cdiv(k, block_k), MAX_SPLIT, (SPLIT_PROGRAMS_PER_SM * _num_sms(device)) // programs))
    return 1 << (split.bit_length() - 1)


# Stacked slices (one shrink over every slice's A, one expand over the whole fused output) while the
# shrink's accumulator stays this narrow; wider (rank 64 on q|k|v) goes slice by slice.
MAX_STACKED_RANK = 128
NO_END = 1 << 30


def stackable(slices: list[int], rank: int) -> bool:
    """Whether a fused projection's slices can take one shrink and one expand: at most 3 slices,
    ranks stacked up to MAX_STACKED_RANK, and column tiles of >= 16 that never straddle two slices."""
    return 1 <= len(slices) <= 3 and len(slices) * rank <= MAX_STACKED_RANK and _slice_block_n(slices, 128) >= 16


def _slice_block_n(slices: list[int], block_n: int) -> int:
    """The largest power of two <= block_n dividing every slice width but the last (the last one's
    tail is masked), so that no column tile straddles two slices."""
    while block_n > 1 and any(w % block_n for w in slices[:-1]):
        block_n //= 2
    return block_n


def add_lora_triton(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
    block_k: int = 128, block_n: int = 128, split: int = 0, slices: list[int] | None = None,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[t] += (x[t] @ a[slots[t]].T) @ b[slots[t]].T in place (y may be a strided column slice).

    With `slices` (a fused projection's output widths, summing to y's width), `a` holds each slice's
    A stacked along the rank ([num_slots, len(slices) * rank, K]) and `b` each slice's B stacked along
    the output ([num_slots, N, rank]): slice i's columns get (x @ A_i.T) @ B_i.T, in two launches.
    `ranks` ([num_slots] int32, on the device): each slot's adapter rank, when slots are wider than
    their adapters (rank-16 adapters in rank-64 slots); the zero padding past it is never read."""
    num_slots, rank_total, k = a.shape
    t, n = y.shape
    slices = slices or [n]
    rank = rank_total // len(slices)
    if t == 0 or rank == 0:
        return y
    if sum(slices) != n or rank * len(slices) != rank_total or b.shape[2] != rank or len(slices) > 3:
        raise ValueError(f"slices {slices} do not fit y {tuple(y.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if a.stride(-1) != 1 or b.stride(-1) != 1:
        a, b = a.contiguous(), b.contiguous()
    block_n = _slice_block_n(slices, block_n)
    ends = [sum(slices[: i + 1]) for i in range(len(slices) - 1)] + [NO_END, NO_END]
    block_t = min(64, max(16, triton.next_power_of_2(t)))
    tiles_t = triton.cdiv(t, block_t)
    if not split:
        split = choose_split(k, block_k, num_slots * tiles_t, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    shrunk = torch.empty((t, rank_total), dtype=torch.float32, device=x.device)  # rows of adapter tokens only
    part = torch.empty((split, t, rank_total), dtype=torch.float32, device=x.device) if split > 1 else shrunk
    locks = arrival_counters(x.device, num_slots * tiles_t)
    ieee = a.dtype == torch.float32
    has_ranks = ranks is not None
    ranks = ranks if ranks is not None else slots  # (not read without HAS_RANKS)
    _shrink_kernel[(num_slots, split, tiles_t)](
        x, a, slots, ranks, part, shrunk, locks, t, k, rank_total, rank, x.stride(0), a.stride(0), a.stride(1),
        part.stride(0) if split > 1 else 0, part.stride(-2), shrunk.stride(0),
        K_PER_SPLIT=k_per_split, SPLIT=split, BLOCK_T=block_t, BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank_total)), IEEE=ieee, HAS_RANKS=has_ranks, num_warps=4,
    )
    _expand_kernel[(num_slots, triton.cdiv(n, block_n), tiles_t)](
        shrunk, b, slots, ranks, y, t, n, rank, shrunk.stride(0), b.stride(0), b.stride(1),
        y.stride(0), y.stride(1), BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), IEEE=ieee, END0=ends[0], END1=ends[1],
        HAS_RANKS=has_ranks, num_warps=4,
    )
    return y
