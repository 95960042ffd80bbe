"""Fused NF4 matrix products in Triton: the packed weight is decoded in registers, never written out.

Three kernels, all reading bitsandbytes' layout as is (int32 words of 8 nibbles, 8-bit absmax with
nested statistics). `_gemv_kernel` (decode, up to 64 rows) computes out^T = W x^T so that the weight
rows fill the matrix unit's M side and the few tokens its N side; `_gemv_fma_kernel` (one to four
rows) multiplies on the CUDA cores in fp32, with no shared memory or barrier in its loop. Both
split K over many programs so the whole GPU streams the weight; the last program of each column
tile to finish adds the fp32 partials (one launch, no memset). `_gemm_kernel` (prefill) tiles M x N.
From DEQUANT_MIN_ROWS rows on, `_dequant_kernel` decodes the weight into a reused 16-bit scratch
matrix and cuBLAS multiplies: for long prompts its tensor-core rate beats the fused tile's.
Decoding (sloth_kernels.triton_nf4_decode): a 16-entry table lookup done with `prmt` byte permutes in
registers, the code then scaled by its block's absmax in 16 bits (`USE_PRMT`, CUDA only), or a table
gather scaled in fp32, which gives exactly bitsandbytes' dequantized values (interpreter, fp32).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .nf4_format import NF4_CODE, NF4Weight
from .triton_nf4_config import (
    DEQUANT_MIN_ROWS,
    FMA_MAX_ROWS,
    GEMV_MAX_ROWS,
    TUNED,
    GemmConfig,
    GemvConfig,
    bucket,
    gemm_config_for,
    gemv_config_for,
)
from .triton_nf4_decode import (
    decode_gather,
    decode_gather_3d,
    decode_prmt_fp32,
    decode_prmt_scaled,
    prmt_tables,
)

__all__ = ["DEQUANT_MIN_ROWS", "FMA_MAX_ROWS", "GEMV_MAX_ROWS", "TUNED", "GemmConfig", "GemvConfig", "bucket", "gemm_config_for",
           "gemv_config_for", "nf4_dequantize", "nf4_matmul", "nf4_matmul_stacked", "supports"]

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, mask,
                  NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, MASKED: tl.constexpr):
    """fp32 absmax of the given blocks (0 where masked); nested: code2[q] * absmax2 + offset, where
    NESTED is 1 (one offset) or 2 (an offset per state2 block: weights fused by concat_nf4)."""
    if NESTED:
        if MASKED:
            q = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
            s2 = tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=mask, other=0.0)
            if NESTED == 2:
                off = tl.load(offset_ptr + blocks // BLOCKSIZE2, mask=mask, other=0.0)
            else:
                off = tl.load(offset_ptr)
            s = tl.where(mask, tl.load(code2_ptr + q) * s2 + off, 0.0)
        else:
            q = tl.load(absmax_ptr + blocks).to(tl.int32)
            if NESTED == 2:  # noqa: SIM108  (a compile-time branch: only one load is emitted)
                off = tl.load(offset_ptr + blocks // BLOCKSIZE2)
            else:
                off = tl.load(offset_ptr)
            s = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blocks // BLOCKSIZE2) + off
    elif MASKED:
        s = tl.load(absmax_ptr + blocks, mask=mask, other=0.0)
    else:
        s = tl.load(absmax_ptr + blocks)
    return s


@triton.jit
def _weight_tile(w_ptr, rn, first_block, mask, s, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7,
                 K: tl.constexpr, KB: tl.constexpr, BLOCKSIZE: tl.constexpr, USE_PRMT: tl.constexpr,
                 DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """Dequantized rows rn of W over absmax blocks first_block .. + KB, [BLOCK_N, KB * BLOCKSIZE] in
    DTYPE; s [BLOCK_N, KB] are those blocks' fp32 scales; mask [BLOCK_N, KB] (if MASKED) the blocks
    that exist (their words load as 0 and their scale is 0 otherwise)."""
    BLOCK_N: tl.constexpr = s.shape[0]
    WPB: tl.constexpr = BLOCKSIZE // 8  # int32 words per absmax block
    ptrs = w_ptr + rn[:, None].to(tl.int64) * (K // 8) + first_block * WPB + tl.arange(0, KB * WPB)[None, :]
    if MASKED:
        word_mask = tl.reshape(tl.broadcast_to(mask[:, :, None], (BLOCK_N, KB, WPB)), (BLOCK_N, KB * WPB))
        words = tl.load(ptrs, mask=word_mask, other=0)
    else:
        words = tl.load(ptrs)
    if USE_PRMT:
        # The block's scale as a pair of 16-bit floats, one per word; decode multiplies in 16 bits.
        s16 = s.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        s2 = tl.reshape(tl.broadcast_to((s16 | (s16 << 16))[:, :, None], (BLOCK_N, KB, WPB)), (BLOCK_N, KB * WPB))
        w = decode_prmt_scaled(words, s2, t0, t1, t2, t3, t4, t5, t6, t7, DTYPE)
    else:
        # code (fp32) * absmax (fp32), rounded once: the very values bitsandbytes dequantizes to.
        codes = tl.reshape(decode_gather(words, code_ptr), (BLOCK_N, KB, BLOCKSIZE))
        w = tl.reshape(codes * s[:, :, None], (BLOCK_N, KB * BLOCKSIZE)).to(DTYPE)
    return w


@triton.jit(do_not_specialize=["M"])  # one compilation serves every row count of a BLOCK_M
def _gemv_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, stride_xm, stride_om, stride_on,
    t0, t1, t2, t3, t4, t5, t6, t7,
    K: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, KB: tl.constexpr, USE_PRMT: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    num_blocks: tl.constexpr = K // BLOCKSIZE
    # No masks along K when the splits tile it exactly, none along N when BLOCK_N divides it.
    EVEN_K: tl.constexpr = (BLOCKS_PER_SPLIT % KB == 0) and (num_blocks == BLOCKS_PER_SPLIT * SPLIT_K)
    MASKED: tl.constexpr = not (EVEN_K and EVEN_N)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    kb = tl.arange(0, KB)
    kk = tl.arange(0, KB * BLOCKSIZE)
    n_mask = rn < N
    m_mask = rm < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Loop bounds are compile-time (K is): one compilation per weight shape, and the interpreter
    # (numpy >= 2.4) cannot take a 1-element array as a range bound.
    for step in range(0, BLOCKS_PER_SPLIT, KB):
        first = pid_k * BLOCKS_PER_SPLIT + step
        left = tl.minimum(BLOCKS_PER_SPLIT - step, num_blocks - first)  # blocks of this step in range
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
    _store_gemv_out(acc, out_ptr, part_ptr, lock_ptr, bias_ptr, rn, rm, n_mask, m_mask, pid_n, pid_k, M, N,
                    stride_om, stride_on, HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _gemv_fma_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, stride_xm, stride_om, stride_on,
    t0, t1, t2, t3, t4, t5, t6, t7,
    K: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, KB: tl.constexpr, USE_PRMT: tl.constexpr, EVEN_N: tl.constexpr,
):
    """The CUDA-core GEMV for 1..BLOCK_M (<= 4) rows: no shared memory, no barrier in the loop.
    Codes are decoded to fp32, multiplied by x in fp32, summed per absmax block, then scaled."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_blocks: tl.constexpr = K // BLOCKSIZE
    EVEN_K: tl.constexpr = (BLOCKS_PER_SPLIT % KB == 0) and (num_blocks == BLOCKS_PER_SPLIT * SPLIT_K)
    MASKED: tl.constexpr = not (EVEN_K and EVEN_N)
    WPB: tl.constexpr = BLOCKSIZE // 8
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    kb = tl.arange(0, KB)
    n_mask = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # [BLOCK_N, KB, WPB] words: the last axis is one absmax block, so its sum stays within a thread
    # or two (no shared memory), and the block's scale applies to that sum.
    w_ptrs = (w_ptr + rn[:, None, None].to(tl.int64) * (K // 8) + kb[None, :, None] * WPB
              + tl.arange(0, WPB)[None, None, :])
    x_off = kb[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    for step in range(0, BLOCKS_PER_SPLIT, KB):
        first = pid_k * BLOCKS_PER_SPLIT + step
        left = tl.minimum(BLOCKS_PER_SPLIT - step, num_blocks - first)
        mask = n_mask[:, None] & (kb < left)[None, :]
        s = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rn[:, None] * num_blocks + first + kb[None, :],
                          mask, NESTED, BLOCKSIZE2, MASKED)
        if MASKED:
            words = tl.load(w_ptrs + first * WPB, mask=mask[:, :, None], other=0)
        else:
            words = tl.load(w_ptrs + first * WPB)
        if USE_PRMT:
            codes = decode_prmt_fp32(words, t0, t1, t2, t3, t4, t5, t6, t7)
        else:
            codes = decode_gather_3d(words, code_ptr)
        for m in tl.static_range(BLOCK_M):
            x_ok = (kb < left)[:, None] & (m < M)
            xm = tl.load(x_ptr + m * stride_xm + first * BLOCKSIZE + x_off, mask=x_ok, other=0.0).to(tl.float32)
            part = tl.sum(codes * xm[None, :, :], axis=2)  # [BLOCK_N, KB] block sums
            acc += tl.where(rm == m, tl.sum(part * s, axis=1)[:, None], 0.0)
    m_mask = rm < M
    _store_gemv_out(acc, out_ptr, part_ptr, lock_ptr, bias_ptr, rn, rm, n_mask, m_mask, pid_n, pid_k, M, N,
                    stride_om, stride_on, HAS_BIAS, SPLIT_K)


@triton.jit
def _store_gemv_out(acc, out_ptr, part_ptr, lock_ptr, bias_ptr, rn, rm, n_mask, m_mask, pid_n, pid_k, M, N,
                    stride_om, stride_on, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """The end of both GEMV kernels: acc [BLOCK_N, BLOCK_M] is out^T's tile. With K split,
    partials go to [SPLIT_K, N, M] fp32; the last program of this column tile to arrive (the
    counter's acq_rel atomic orders the others' stores before it) sums them and resets the counter."""
    out_mask = n_mask[:, None] & m_mask[None, :]
    out_ptrs = out_ptr + rm[None, :] * stride_om + rn[:, None] * stride_on
    if SPLIT_K == 1:
        _store_out(acc, out_ptrs, out_mask, bias_ptr, rn, n_mask, HAS_BIAS, 0)
    else:
        part_ptrs = part_ptr + rn[:, None] * M + rm[None, :]
        tl.store(part_ptrs + pid_k * N * M, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid_n, 1)
        if arrived == SPLIT_K - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part_ptrs + s * N * M, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + pid_n, 0)
            _store_out(total, out_ptrs, out_mask, bias_ptr, rn, n_mask, HAS_BIAS, 0)


@triton.jit
def _store_out(acc, ptrs, mask, bias_ptr, rn, n_mask, HAS_BIAS: tl.constexpr, N_AXIS: tl.constexpr):
    """acc (fp32) + bias[rn] along axis N_AXIS, stored in the output's dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        if N_AXIS == 0:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, bias_ptr, out_ptr,
    M, N, stride_xm, stride_om, stride_on,
    t0, t1, t2, t3, t4, t5, t6, t7,
    K: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr,
    GROUP_M: tl.constexpr, USE_PRMT: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)  # programs of a group share weight tiles in L2
    first_m = group * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_m
    pid_n = (pid % (GROUP_M * grid_n)) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    num_blocks: tl.constexpr = K // BLOCKSIZE
    EVEN_K: tl.constexpr = num_blocks % KB == 0
    MASKED: tl.constexpr = not (EVEN_K and EVEN_N)
    kb = tl.arange(0, KB)
    kk = tl.arange(0, KB * BLOCKSIZE)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(0, num_blocks, KB):
        left = num_blocks - first
        mask = n_mask[:, None] & (kb < left)[None, :]
        s = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rn[:, None] * num_blocks + first + kb[None, :],
                          mask, NESTED, BLOCKSIZE2, MASKED)
        w = _weight_tile(w_ptr, rn, first, mask, s, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7,
                         K, KB, BLOCKSIZE, USE_PRMT, x_ptr.dtype.element_ty, MASKED)
        if EVEN_K:
            xs = tl.load(x_rows + first * BLOCKSIZE, mask=m_mask[:, None], other=0.0)
        else:
            xs = tl.load(x_rows + first * BLOCKSIZE, mask=m_mask[:, None] & (kk < left * BLOCKSIZE)[None, :], other=0.0)
        acc = tl.dot(xs, tl.trans(w), acc)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    _store_out(acc, out_ptrs, m_mask[:, None] & n_mask[None, :], bias_ptr, rn, n_mask, HAS_BIAS, 1)


@triton.jit
def _dequant_kernel(
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, N,
    t0, t1, t2, t3, t4, t5, t6, t7,
    K: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    BLOCK_N: tl.constexpr, KB: tl.constexpr, USE_PRMT: tl.constexpr,
):
    """out [N, K] (row-major, out's dtype) = the decoded weight, one [BLOCK_N, KB blocks] tile a program."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(1) * KB
    num_blocks: tl.constexpr = K // BLOCKSIZE
    kb = tl.arange(0, KB)
    n_mask = rn < N
    mask = n_mask[:, None] & (first + kb < num_blocks)[None, :]
    s = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rn[:, None] * num_blocks + first + kb[None, :],
                      mask, NESTED, BLOCKSIZE2, True)
    w = _weight_tile(w_ptr, rn, first, mask, s, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7,
                     K, KB, BLOCKSIZE, USE_PRMT, out_ptr.dtype.element_ty, True)
    kk = first * BLOCKSIZE + tl.arange(0, KB * BLOCKSIZE)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * K + kk[None, :], w, mask=n_mask[:, None] & (kk < K)[None, :])


def supports(x: torch.Tensor, w: NF4Weight) -> bool:
    """Shapes the kernels take: whole absmax blocks per row, a power-of-two blocksize of 32..256."""
    bs = w.blocksize
    return (x.dtype in _TL_DTYPES and w.shape[1] % bs == 0 and bs in (32, 64, 128, 256)
            and w.state2_blocksize in (64, 128, 256, 512, 1024) and x.device == w.device)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter on CPU: any small count
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _code_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device).to(dtype)


_LOCKS: dict[torch.device, torch.Tensor] = {}
_RETIRED_LOCKS: list[torch.Tensor] = []  # outgrown counters: captured CUDA graphs may still use them


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-device arrival counters, zero between launches (the last program resets its own); the
    NF4 split-K products and the multi-LoRA shrink share them. One stream at a time: two split-K
    launches running concurrently would share them."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < n:
        if locks is not None:
            _RETIRED_LOCKS.append(locks)
        locks = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _LOCKS[device] = locks
    return locks


def _split_k(cfg: GemvConfig, tiles_n: int, num_blocks: int, device: torch.device) -> int:
    """How many programs share each column tile's K. When KB divides the blocks, a divisor of the
    steps (so no K masks) giving about `waves` programs per SM; otherwise an even share."""
    if cfg.split_k:
        return max(1, min(cfg.split_k, num_blocks))
    target = cfg.waves * _num_sms(device)
    if num_blocks % cfg.kb:
        return max(1, min(num_blocks, round(target / tiles_n)))
    steps = num_blocks // cfg.kb
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: abs(math.log(tiles_n * d / target)))


def _nested_mode(w: NF4Weight) -> int:
    """The kernels' NESTED: 0 plain fp32 absmax, 1 nested with one offset, 2 an offset per state2 block."""
    return 0 if not w.nested else 2 if w.group_offsets else 1


def _weight_args(w: NF4Weight) -> list[torch.Tensor]:
    """Packed words and block statistics; without nested statistics the unused slots get absmax."""
    if w.nested:
        assert w.state2_absmax is not None and w.state2_code is not None and w.offset is not None
        return [w.data.view(torch.int32), w.absmax, w.state2_absmax, w.state2_code, w.offset]
    return [w.data.view(torch.int32), w.absmax, w.absmax, w.absmax, w.absmax]


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """One decoded-weight buffer per device and dtype, grown to the largest weight seen. Kernels on
    one stream run in order, so every layer can reuse it."""
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop((device, dtype), None)
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[(device, dtype)] = buf
    return buf[:numel]


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None, use_prmt: bool = True,
                   block_n: int = 32, kb: int = 4) -> torch.Tensor:
    """The decoded weight [N, K] in `dtype` (written into `out`, row-major, when given)."""
    n, k = w.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=w.device)
    use_prmt = use_prmt and dtype != torch.float32
    tables = prmt_tables(dtype) if use_prmt else (0,) * 8
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // w.blocksize, kb))
    _dequant_kernel[grid](
        *_weight_args(w), _code_table(w.device, torch.float32), out, n, *tables, K=k, NESTED=_nested_mode(w),
        BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.state2_blocksize, BLOCK_N=block_n, KB=kb, USE_PRMT=use_prmt,
        num_warps=4,
    )
    return out


def _decoded_product(x: torch.Tensor, ws: list[NF4Weight], use_prmt: list[bool], out: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ [W0; W1; ...].T (+ bias) into `out`: the weights decoded one under the other into the
    scratch matrix, then one cuBLAS product (long prompts)."""
    k = x.shape[1]
    total = sum(w.shape[0] for w in ws)
    w16 = _scratch(x.device, x.dtype, total * k).view(total, k)
    offset = 0
    for w, prmt in zip(ws, use_prmt, strict=True):
        nf4_dequantize(w, x.dtype, w16[offset : offset + w.shape[0]], prmt)
        offset += w.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is None:
        return torch.mm(x, w16.t(), out=out)
    return torch.addmm(bias, x, w16.t(), out=out)


def nf4_matmul(
    x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
    gemv: GemvConfig | None = None, gemm: GemmConfig | None = None, dequant_min_rows: int = DEQUANT_MIN_ROWS,
) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) -> [M, N] in x.dtype, written into `out` (any strides) if given."""
    m, k = x.shape
    n = w.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if m >= dequant_min_rows:
        return _decoded_product(x, [w], [(gemm or gemm_config_for(m, n, k)).use_prmt], out, bias)
    use_gemv = m <= GEMV_MAX_ROWS
    cfg_v = gemv or gemv_config_for(m, n, k)
    cfg_m = gemm or gemm_config_for(m, n, k)
    # fp32 activations take the gather path (the prmt tables hold 16-bit codes).
    use_prmt = (cfg_v.use_prmt if use_gemv else cfg_m.use_prmt) and x.dtype != torch.float32
    use_fma = use_gemv and cfg_v.cuda_cores and m <= FMA_MAX_ROWS
    # The CUDA-core kernel decodes to fp32 through bf16-rounded codes, whatever x's dtype.
    tables = prmt_tables(torch.bfloat16 if use_fma else x.dtype) if use_prmt else (0,) * 8
    code = _code_table(x.device, torch.float32)
    bias_arg = bias if bias is not None else out
    args = [*_weight_args(w), code, bias_arg, out]
    meta = dict(NESTED=_nested_mode(w), HAS_BIAS=bias is not None, BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.state2_blocksize,
                USE_PRMT=use_prmt)
    num_blocks = k // w.blocksize
    if use_gemv:
        block_m = triton.next_power_of_2(m) if use_fma else max(16, triton.next_power_of_2(m))
        tiles_n = triton.cdiv(n, cfg_v.block_n)
        split = _split_k(cfg_v, tiles_n, num_blocks, x.device)
        per_split = triton.cdiv(num_blocks, split)
        split = triton.cdiv(num_blocks, per_split)  # no empty splits
        part = torch.empty((split, n, m), dtype=torch.float32, device=x.device) if split > 1 else out
        locks = arrival_counters(x.device, tiles_n) if split > 1 else out
        kernel = _gemv_fma_kernel if use_fma else _gemv_kernel
        kernel[(tiles_n, split)](
            x, *args, part, locks, m, n, x.stride(0), out.stride(0), out.stride(1), *tables,
            K=k, BLOCKS_PER_SPLIT=per_split, SPLIT_K=split, BLOCK_N=cfg_v.block_n, BLOCK_M=block_m, KB=cfg_v.kb,
            EVEN_N=n % cfg_v.block_n == 0, num_warps=cfg_v.num_warps, num_stages=cfg_v.num_stages, **meta,
        )
        return out
    grid = (triton.cdiv(m, cfg_m.block_m) * triton.cdiv(n, cfg_m.block_n),)
    _gemm_kernel[grid](
        x, *args, m, n, x.stride(0), out.stride(0), out.stride(1), *tables, K=k,
        BLOCK_M=cfg_m.block_m, BLOCK_N=cfg_m.block_n, KB=cfg_m.kb, GROUP_M=cfg_m.group_m,
        EVEN_N=n % cfg_m.block_n == 0, num_warps=cfg_m.num_warps, num_stages=cfg_m.num_stages, **meta,
    )
    return out


def nf4_matmul_stacked(x: torch.Tensor, ws: list[NF4Weight], out: torch.Tensor | None = None,
                       dequant_min_rows: int = DEQUANT_MIN_ROWS, use_prmt: bool = True) -> torch.Tensor:
    """x [M, K] @ [W0; W1; ...].T -> [M, sum N] for weights sharing K (q|k|v, gate|up). From
    DEQUANT_MIN_ROWS rows on, the slices are decoded into one scratch matrix and multiplied once
    (one cuBLAS call, no per-slice output copies); below, each slice's kernel writes its columns."""
    m, k = x.shape
    total = sum(w.shape[0] for w in ws)
    if out is None:
        out = torch.empty((m, total), dtype=x.dtype, device=x.device)
    if m >= dequant_min_rows:
        prmt = [use_prmt and gemm_config_for(m, w.shape[0], k).use_prmt for w in ws]
        return _decoded_product(x, ws, prmt, out)
    offset = 0
    for w in ws:
        nf4_matmul(x, w, out=out[:, offset : offset + w.shape[0]], dequant_min_rows=dequant_min_rows)
        offset += w.shape[0]
    return out
