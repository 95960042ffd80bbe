"""Token sampling in Triton, one program per row, no sort.

The reference (sloth_kernels.sampling.sample_ref) sorts each row for top-k and top-p. Here both cut-offs
are found by bisection over the row, on the order-preserving integer image of the fp32 values, so
32 rounds pin the exact boundary value: top-k keeps the values >= the k-th largest; top-p keeps a
value when the probability mass strictly above it is < top_p (the top token always stays), over
the top-k survivors renormalised; min-p keeps exp(x - max) >= min_p. Then argmax of exp(x - max) / q
over the kept tokens (q ~ Exp(1) given by the caller) draws from the renormalised distribution.
Passes over a row: 2, plus 32 each for an active top-k or top-p (each pass accumulates per lane and
reduces once); a row of 128K fp32 logits is 512 KB, so the extra passes read L2, not HBM, but one
program walks its row alone: its speed against the sort is not measured yet, so the server uses it
only when asked (`--sampler triton`). Ties at a cut-off keep every tied token (the sort keeps the
first ones in its order), and its fp32 exp is not torch's: near ties can go the other way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _key(x):
    """fp32 -> int32 whose signed order is the float order (-inf smallest, +inf largest)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _sample_kernel(
    logits_ptr, q_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr,
    V, stride_l, stride_q, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    lp = logits_ptr + row.to(tl.int64) * stride_l
    qp = q_ptr + row.to(tl.int64) * stride_q
    temp = tl.load(temp_ptr + row)
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    offs = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    mx_acc = tl.full((BLOCK,), neg_inf, tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(lp + start + offs, mask=start + offs < V, other=neg_inf) / temp
        mx_acc = tl.maximum(mx_acc, x)
    mx = tl.max(mx_acc, 0)

    # top-k: the largest threshold t with count(key >= t) >= k; lo holds, hi fails.
    lo_k = tl.full((), -2147483648, tl.int64)
    if k < V:
        hi = tl.full((), 2147483647, tl.int64) + 1
        for _ in range(32):
            mid = lo_k + (hi - lo_k) // 2
            count_acc = tl.zeros((BLOCK,), tl.int32)
            for start in range(0, V, BLOCK):
                x = tl.load(lp + start + offs, mask=start + offs < V, other=neg_inf) / temp
                keep = (_key(x).to(tl.int64) >= mid) & (start + offs < V)
                count_acc += keep.to(tl.int32)
            ok = tl.sum(count_acc, 0) >= k
            lo_k = tl.where(ok, mid, lo_k)
            hi = tl.where(ok, hi, mid)
    thr = lo_k

    # top-p over the top-k survivors: the smallest t with mass(key > t) < p * total; keep key >= t.
    if p < 1.0:
        total_acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(lp + start + offs, mask=start + offs < V, other=neg_inf) / temp
            total_acc += tl.where(_key(x).to(tl.int64) >= lo_k, tl.exp(x - mx), 0.0)
        total = tl.sum(total_acc, 0)
        lo = lo_k - 1
        hi_p = tl.full((), 2147483647, tl.int64) + 1
        for _ in range(32):
            mid = lo + (hi_p - lo) // 2
            mass_acc = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, V, BLOCK):
                x = tl.load(lp + start + offs, mask=start + offs < V, other=neg_inf) / temp
                key = _key(x).to(tl.int64)
                mass_acc += tl.where((key >= lo_k) & (key > mid), tl.exp(x - mx), 0.0)
            below = tl.sum(mass_acc, 0) < p * total
            hi_p = tl.where(below, mid, hi_p)
            lo = tl.where(below, lo, mid)
        thr = tl.maximum(thr, hi_p)

    # min-p: p / p_max = exp(x - mx) >= min_p; then the exponential race over what is kept.
    best = tl.full((), -2.0, tl.float32)
    best_idx = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        valid = idx < V
        x = tl.load(lp + idx, mask=valid, other=neg_inf) / temp
        e = tl.exp(x - mx)
        keep = valid & (_key(x).to(tl.int64) >= thr) & (e > 0) & (e >= min_p)
        qv = tl.load(qp + idx, mask=valid, other=1.0)
        score = tl.where(keep, e / qv, -1.0)
        block_best = tl.max(score, 0)
        block_idx = tl.argmax(score, 0)
        better = block_best > best
        best_idx = tl.where(better, start + block_idx, best_idx)
        best = tl.where(better, block_best, best)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def sample_triton(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, q: torch.Tensor,
) -> torch.Tensor:
    """Same contract as sloth_kernels.sampling.sample_ref: logits [B, V] fp32 -> token ids [B] (int64)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if q.stride(1) != 1:
        q = q.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    _sample_kernel[(rows,)](
        logits, q, temperature.float().contiguous(), top_k.to(torch.int32).contiguous(),
        top_p.float().contiguous(), min_p.float().contiguous(), out,
        vocab, logits.stride(0), q.stride(0), BLOCK=BLOCK, num_warps=8,
    )
    return out
