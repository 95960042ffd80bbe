"""Triton KV-cache write and paged attention over [num_blocks, block_size, num_kv_heads, head_dim].

One kernel serves prefill, chunked prefill and decode: a program takes a tile of BLOCK_M query rows
= BLOCK_Q tokens x GROUP q heads of one kv head (GQA heads share each K/V load) and walks the
sequence's keys in BLOCK_N tiles gathered through the block table, with an online softmax. Decode
steps (one query per sequence) may split the keys over programs (flash-decoding) and merge the
partial results in a second kernel. Grids depend on host ints and tensor shapes only. Gemma 2's
score soft-capping is a constexpr variant (SOFTCAP), and so are gpt-oss's attention sinks (SINKS: a
per-head logit added to the softmax's denominator once, after the last key tile or in the merge of the
splits): the others compile exactly as without them. A batch whose decodes the host does not know
(a CUDA graph of mixed steps: num_decodes -1) runs both kernels over every sequence, each program
returning at once where the sequence is the other kernel's (BY_LEN). A per-token key end is a
constexpr variant too (KEY_END: a prefill query sees keys up to max(its position + 1, key_ends[t]),
Gemma 3's bidirectional image spans): the tile loop runs to the furthest end of its rows and masks
each row at its own.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    """Smallest power of two >= n (triton.next_power_of_2 costs microseconds per call on the host)."""
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)

LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_co, stride_ch,
    num_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot < 0:  # padding token (e.g. a CUDA-graph batch slot with no sequence)
        return
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (cols < head_dim)[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + heads[:, None] * stride_ch + cols[None, :]
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + cols[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + cols[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_tokens, num_heads, head_dim = k.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k/v caches must share a layout"
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k and v need a unit stride in head_dim"
    if num_tokens == 0:
        return
    block_h, block_d = _pow2(num_heads), _pow2(head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, q_base, q_block, BLOCK_Q: tl.constexpr):
    """The sequence owning q_block, where sequence b's q blocks start at (start[b] - q_base) // BLOCK_Q + b."""
    lo = q_block * 0  # a tensor, so that the loop-carried type stays int32
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = (tl.load(query_start_loc_ptr + mid) - q_base) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    """tanh from one exp2 (Triton has no tanh the interpreter runs): sign(x) (1 - e^-2|x|) / (1 + e^-2|x|)."""
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, k_base, v_base, table_ptr, start, hi, q_pos, q_lim, window,
    stride_kb, stride_ko, stride_vb, stride_vo, cols, col_ok, scale_log2, softcap_log2,
    MASKED: tl.constexpr, SLIDING: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    keys = start + tl.arange(0, BLOCK_N)
    key_ok = keys < hi
    block = tl.load(table_ptr + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    offset = keys % BLOCK_SIZE
    kv_mask = key_ok[:, None] & col_ok[None, :]
    k = tl.load(k_base + (block * stride_kb + offset * stride_ko)[:, None] + cols[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + (block * stride_vb + offset * stride_vo)[:, None] + cols[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if SOFTCAP:  # s is score / softcap here (see _launch): softcap * tanh(that), in log2 units
        s = _tanh(s) * softcap_log2
    if MASKED:
        visible = key_ok[None, :] & (keys[None, :] < q_lim[:, None])
        if SLIDING:
            visible &= keys[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


# Batch sizes, counts and the block-table width change every step: don't compile a variant for each
# value that is 1 or a multiple of 16 (K/V/q strides stay specialized: they tell Triton that rows are
# 16-byte aligned, which its vector loads and cp.async pipelining need).
@triton.jit(do_not_specialize=["num_seqs", "q_base", "num_splits", "window", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr, sinks_ptr, key_ends_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_seqs, q_base, num_splits, scale_log2, softcap_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr, SPLIT: tl.constexpr, SLIDING: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, SINKS: tl.constexpr, BY_LEN: tl.constexpr = False, KEY_END: tl.constexpr = False,
):
    q_block = tl.program_id(0)
    if not DECODE:  # the last q blocks of a sequence see the most keys: start them first
        q_block = tl.num_programs(0) - 1 - q_block
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one query per sequence: q block b is sequence b
        seq = q_block
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        first_tok = q_len * 0
    else:
        seq = _find_seq(query_start_loc_ptr, num_seqs, q_base, q_block, BLOCK_Q)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        first_tok = (q_block - ((q_start - q_base) // BLOCK_Q + seq)) * BLOCK_Q
    if first_tok >= q_len:  # the grid is an upper bound on the number of q blocks
        return
    if BY_LEN:  # a query of one token is the decode kernel's, longer ones the prefill kernel's
        if DECODE:
            if q_len != 1:
                return
        elif q_len == 1:
            return
    last_tok = tl.minimum(q_len, first_tok + BLOCK_Q) - 1
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = first_tok + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    q_pos = context + tok
    q_lim = q_pos + 1  # each row's keys end (exclusive)
    # Keys [lo, hi) are visible to some row; tiles below n_full are visible to every row (no mask).
    hi = context + last_tok + 1
    if KEY_END:  # rows inside a bidirectional span see keys after themselves, never past the sequence
        ends = tl.load(key_ends_ptr + q_start + tok, mask=row_ok, other=0)
        q_lim = tl.minimum(tl.maximum(q_lim, ends), seq_len)
        hi = tl.maximum(hi, tl.max(tl.where(row_ok, q_lim, 0), axis=0))
    lo = 0
    n_full = (context + first_tok + 1) // BLOCK_N
    if SLIDING:
        lo = tl.maximum(0, context + first_tok - window + 1)
        n_full = (context + first_tok + 1 - lo) // BLOCK_N
        if tl.maximum(0, context + last_tok - window + 1) != lo:
            n_full = 0
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    tile_lo = 0
    tile_hi = n_tiles
    if SPLIT:
        per_split = tl.cdiv(n_tiles, num_splits)
        tile_lo = tl.minimum(split * per_split, n_tiles)
        tile_hi = tl.minimum(tile_lo + per_split, n_tiles)

    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mid = tl.maximum(tl.minimum(n_full, tile_hi), tile_lo)
    for t in range(tile_lo, mid):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base, v_base, table_ptr, lo + t * BLOCK_N, hi, q_pos, q_lim, window,
            stride_kb, stride_ko, stride_vb, stride_vo, cols, col_ok, scale_log2, softcap_log2,
            False, SLIDING, BLOCK_SIZE, BLOCK_N, PRECISION, SOFTCAP,
        )
    for t in range(mid, tile_hi):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base, v_base, table_ptr, lo + t * BLOCK_N, hi, q_pos, q_lim, window,
            stride_kb, stride_ko, stride_vb, stride_vo, cols, col_ok, scale_log2, softcap_log2,
            True, SLIDING, BLOCK_SIZE, BLOCK_N, PRECISION, SOFTCAP,
        )

    if SPLIT:  # partials [T, Hq, num_splits, D] and (m, l) [T, Hq, num_splits, 2]
        part = ((q_start + tok).to(tl.int64) * (GROUP * tl.num_programs(1)) + head) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        if SINKS:  # the sink's logit (natural units: log2 here) joins the denominator, attending to nothing
            sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            m_f = tl.maximum(m_i, sink)
            rescale = tl.exp2(m_i - m_f)
            acc = acc * rescale[:, None]
            l_i = l_i * rescale + tl.exp2(sink - m_f)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_rows = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_rows[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, sinks_ptr, num_heads, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SINKS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    s_ok = splits < num_splits
    part = (t * num_heads + h) * num_splits + splits
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + cols[None, :],
                  mask=s_ok[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    sink_term = 0.0
    if SINKS:  # once per (token, head), not per split
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
        sink_term = tl.exp2(sink - m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    denom = tl.sum(l_s * w, axis=0) + sink_term
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)  # padded rows: 0
    tl.store(out_ptr + t * stride_ot + h * stride_oh + cols, out.to(out_ptr.dtype.element_ty), mask=cols < HEAD_DIM)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_num_splits(
    batch: int, num_kv_heads: int, max_keys: int, block_n: int, device: torch.device, programs_per_sm: int = 4
) -> int:
    """Key splits per (sequence, kv head) so that a small decode batch still fills the GPU. Depends
    only on shapes and host ints, so a captured CUDA graph keeps its grid. From 2 programs per SM
    on, splitting measured slower (merge pass) on an H200; below, aim at programs_per_sm."""
    programs = batch * num_kv_heads
    sms = _num_sms(device)
    if programs >= 2 * sms:
        return 1
    target = programs_per_sm * sms
    tiles = _cdiv(max(max_keys, 1), block_n)
    return max(1, min(_cdiv(target, programs), _cdiv(tiles, 2)))


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    num_decodes: int = 0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    key_ends: torch.Tensor | None = None,
    **tiles: int,
) -> torch.Tensor:
    """q [T, Hq, D] (strided view allowed) -> [T, Hq, D]. `max_query_len` == 1 takes the decode
    path. With 0 < num_decodes < batch, the first num_decodes sequences (one query token each) take
    the decode kernel and the rest the prefill kernel; with num_decodes -1 (which sequences have one
    query token is known on the device only), both kernels run over every sequence, and each takes
    its own (the decode kernel then does not split keys: the merge pass would write every row). `softcap`: scores become softcap *
    tanh(scores / softcap) (Gemma 2). `sinks` [Hq]: each head's sink logit (gpt-oss). `key_ends`
    [T] int32: query t sees keys before max(its position + 1, key_ends[t]), read by the prefill
    kernel only (a decode token never sits inside a bidirectional span). `tiles`
    overrides tile choices (block_m, block_n, num_warps, num_stages, num_splits, programs_per_sm) for
    benchmarks and tests."""
    num_tokens, num_heads, head_dim = q.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert num_heads % k_cache.shape[2] == 0, f"{num_heads} q heads do not split into {k_cache.shape[2]} kv heads"
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    batch = block_tables.shape[0]
    args = (q, k_cache, v_cache, out, scale, sliding_window, softcap, sinks)
    if max_query_len == 1:
        _launch(*args, None, block_tables, seq_lens, query_start_loc, batch, num_tokens, 0, 1, tiles)
    elif num_decodes < 0:
        _launch(*args, None, block_tables, seq_lens, query_start_loc, batch, num_tokens, 0, 1, tiles, by_len=True)
        _launch(*args, key_ends, block_tables, seq_lens, query_start_loc, batch, num_tokens, 0, max_query_len,
                tiles, by_len=True)
    elif 0 < num_decodes < batch:
        _launch(*args, None, block_tables, seq_lens, query_start_loc, num_decodes, num_decodes, 0, 1, tiles)
        _launch(*args, key_ends, block_tables[num_decodes:], seq_lens[num_decodes:], query_start_loc[num_decodes:],
                batch - num_decodes, num_tokens - num_decodes, num_decodes, max_query_len, tiles)
    else:
        _launch(*args, key_ends, block_tables, seq_lens, query_start_loc, batch, num_tokens, 0, max_query_len,
                tiles)
    return out


def _launch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, scale: float,
    sliding_window: int | None, softcap: float | None, sinks: torch.Tensor | None, key_ends: torch.Tensor | None,
    block_tables: torch.Tensor, seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    batch: int, num_tokens: int, q_base: int, max_query_len: int, tiles: dict[str, int], by_len: bool = False,
) -> None:
    """Attention for `batch` sequences whose `num_tokens` queries start at token q_base. `by_len`:
    only the sequences of one query token (decode) or only the others (prefill)."""
    if num_tokens == 0:
        return
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    decode = max_query_len == 1
    group_rows = max(16, _pow2(group))
    # Tiles measured on an H200 at Llama-3-8B shapes (bench/results/kernels-attn.md): few decode
    # programs want short key tiles (more loads in flight per byte), many want long ones.
    if decode:
        block_m = group_rows
        programs, sms = batch * num_kv_heads, _num_sms(q.device)
        block_n = tiles.get("block_n", 32 if programs < sms else 64 if programs < 2 * sms else 128)
    else:
        block_m = tiles.get("block_m", max(group_rows, min(128, _pow2(max_query_len * group))))
        block_n = tiles.get("block_n", 128 if block_m >= 128 else 64)
    if head_dim > 128:
        # Gemma's 256-wide heads: the 128-row tiles measured at 128 need 321 KiB of shared memory
        # for q, k and v over the pipeline's stages, past the H200's 227 KiB.
        block_m, block_n = max(group_rows, min(block_m, 64)), min(block_n, 32)
    if head_dim > 256:
        # Gemma 4's 512-wide heads of its full layers: a 64-row accumulator spills 2 KB of registers
        # per thread at 4 warps (bench/results/kernel-resources-sm90.md); 32 rows over 8 warps do not,
        # nor does a decode tile over 8.
        block_m = max(group_rows, min(block_m, 32))
    block_q = 1 if decode else block_m // group
    num_splits = tiles.get("num_splits", 1) if decode and not by_len else 1  # only decode splits its keys
    if decode and not by_len and "num_splits" not in tiles:
        max_keys = block_tables.shape[1] * block_size
        max_keys = max_keys if sliding_window is None else min(max_keys, sliding_window)
        num_splits = decode_num_splits(batch, num_kv_heads, max_keys, block_n, q.device,
                                       tiles.get("programs_per_sm", 4))
    split = num_splits > 1
    part_acc = part_ml = out  # unused unless split
    if split:
        part_acc = torch.empty((num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((num_tokens, num_heads, num_splits, 2), dtype=torch.float32, device=q.device)
    num_q_blocks = batch if decode else num_tokens // block_q + batch
    # Scores leave the dot multiplied by scale_log2: log2-scaled scores, or with a soft cap the
    # scores over the cap (tanh's argument), which the kernel then scales by cap * log2(e).
    scale_log2, softcap_log2 = (scale * LOG2E, 0.0) if softcap is None else (scale / softcap, softcap * LOG2E)
    extra = {"num_stages": tiles["num_stages"]} if "num_stages" in tiles else {}
    sinks_arg = out if sinks is None else sinks  # unread unless SINKS
    key_end = key_ends is not None and not decode
    key_ends_arg = key_ends if key_end else seq_lens  # unread unless KEY_END
    _paged_attention_kernel[(num_q_blocks, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_ml, sinks_arg, key_ends_arg,
        block_tables, seq_lens, query_start_loc,
        batch, q_base, num_splits, scale_log2, softcap_log2, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=max(16, _pow2(head_dim)), GROUP=group, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        DECODE=decode, SPLIT=split, SLIDING=sliding_window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no tf32)
        SOFTCAP=softcap is not None, SINKS=sinks is not None, BY_LEN=by_len, KEY_END=key_end,
        num_warps=tiles.get("num_warps", 8 if block_m >= 128 or head_dim > 256 else 4), **extra,
    )
    if split:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_ml, out, sinks_arg, num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=_pow2(head_dim),
            BLOCK_S=_pow2(num_splits), SINKS=sinks is not None, num_warps=4 if head_dim >= 128 else 2,
        )


def compile_variants(
    num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, block: int, max_keys: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    key_ends: bool = False,
) -> int:
    """Launch, once, every kernel variant the dispatcher above can pick for these head counts, on one
    sequence whose block table points at `block` (only read). Triton compiles a variant the first
    time a process runs it, and a compile holds up every request of that step (0.5 s for a decode
    variant first met by a mixed step on the H200): decode with each key tile unsplit and split
    (each merge width up to the most splits `decode_num_splits` gives for `max_keys`), and prefill
    with each query tile (and, with `key_ends`, each query tile with per-token key ends too: an
    image-text model whose images attend both ways). Returns the number of launches."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    device, dtype = k_cache.device, k_cache.dtype
    group = num_heads // num_kv_heads
    launches = 0

    def attend(num_tokens: int, ends: bool = False, **tiles: int) -> None:
        nonlocal launches
        q = torch.zeros((num_tokens, num_heads, head_dim), dtype=dtype, device=device)
        tables = torch.full((1, _cdiv(num_tokens, block_size)), block, dtype=torch.int32, device=device)
        seq_lens = torch.tensor([num_tokens], dtype=torch.int32, device=device)
        starts = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
        key_end = torch.full((num_tokens,), num_tokens, dtype=torch.int32, device=device) if ends else None
        paged_attention_triton(q, k_cache, v_cache, tables, seq_lens, starts, num_tokens, 1.0, sliding_window,
                               softcap=softcap, sinks=sinks, key_ends=key_end, **tiles)
        launches += 1

    most_splits = max(decode_num_splits(1, num_kv_heads, max_keys, n, device) for n in (32, 64, 128))
    for block_n in (32, 64, 128):
        attend(1, block_n=block_n, num_splits=1)
        splits = 2
        while splits < 2 * most_splits:
            attend(1, block_n=block_n, num_splits=splits)
            splits *= 2
    query_len = 2
    while True:  # the query tile grows with the longest prompt chunk, up to 128 rows
        attend(query_len)
        if key_ends:
            attend(query_len, ends=True)
        if _pow2(query_len * group) >= 128:
            break
        query_len *= 2
    return launches
