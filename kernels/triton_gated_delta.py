"""Triton gated delta rule (see `gated_delta.gated_delta_rule_ref`), q and k normalized before (in
float32). Two forms, chosen per sequence of the step:

- token by token (`_gated_delta_kernel`): one program per (sequence, head, block of value dims) holds
  its slice of the state [k_dim, BLOCK_V] in registers and walks the sequence's tokens, so a decode
  step reads and writes each state once;
- chunked (`_chunk_prep_kernel` then `_chunk_state_kernel`), for sequences of CHUNK tokens or more:
  the algebra of `gated_delta.chunked_span` with tensor-core products. The first kernel, one program
  per (chunk, head), is what does not depend on the state: the running decay sum G, the unit lower
  triangular inverse T = (I + A)^-1 by forward substitution, and W = T beta exp(G) K, U = T beta V
  (so that the values written are U - W S0). The second, one program per (sequence, head, block of
  value dims), walks the sequence's chunks carrying the state: values U - W S, outputs
  exp(G) Q S + (decayed, causal Q K^T) (U - W S), next state exp(G_C) S + (decayed K)^T (U - W S).

Both continue from the state the previous prompt chunk left (or zeros for a new prompt)."""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .gated_delta_inputs import CHUNK, normalize_qk
from .state_batch import StateBatch

# The chunked kernels' products: tensor cores, three TF32 products per float32 one (hi*hi + hi*lo +
# lo*hi), close to float32's accuracy. Plain IEEE float32 products run on CUDA cores and keep whole
# operand rows in registers, which spilled tens of KB per thread at 128-wide heads.
PRECISION = "tf32x3"


@triton.jit
def _gated_delta_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, state_ptr, out_ptr, qsl_ptr, slot_ptr, init_ptr, ids_ptr,
    heads, dk, dv, stride_qt, stride_qh, stride_vt, stride_vh, stride_gt, stride_ot, stride_oh,
    stride_ss, stride_sh, stride_sk,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_IDS: tl.constexpr,
):
    seq = tl.program_id(0)
    if HAS_IDS:  # a subset of the step's sequences (the others take the chunked form)
        seq = tl.load(ids_ptr + seq)
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


@triton.jit
def _chunk_prep_kernel(
    k_ptr, v_ptr, g_ptr, b_ptr, cstart_ptr, cend_ptr, gcum_ptr, w_ptr, u_ptr,
    dk, dv, stride_qt, stride_qh, stride_vt, stride_vh, stride_gt, stride_ut, stride_uh,
    C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    start = tl.load(cstart_ptr + chunk)
    end = tl.load(cend_ptr + chunk)
    rows = tl.arange(0, C)
    toks = start + rows
    ok = toks < end
    krows = tl.arange(0, BLOCK_K)
    vcols = tl.arange(0, BLOCK_DV)
    k_tile = ok[:, None] & (krows < dk)[None, :]
    v_tile = ok[:, None] & (vcols < dv)[None, :]
    k = tl.load(k_ptr + toks[:, None] * stride_qt + head * stride_qh + krows[None, :], mask=k_tile, other=0.0)
    g = tl.load(g_ptr + toks * stride_gt + head, mask=ok, other=0.0)
    beta = tl.load(b_ptr + toks * stride_gt + head, mask=ok, other=0.0)
    gsum = tl.cumsum(g, axis=0)  # G_i: the decay's log from the chunk's start through token i
    tl.store(gcum_ptr + toks * stride_gt + head, gsum, mask=ok)
    below = rows[:, None] > rows[None, :]
    gap = tl.where(below, gsum[:, None] - gsum[None, :], 0.0)  # <= 0 below the diagonal: no overflow
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
    a = tl.where(below, beta[:, None] * kk * tl.exp(gap), 0.0)
    # T = (I + A)^-1, row by row: T_i = e_i - sum_{j < i} A_ij T_j (rows past i are still zero).
    t_inv = tl.zeros([C, C], dtype=tl.float32)
    for i in range(C):
        a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.0), axis=0)
        t_i = tl.where(rows == i, 1.0, -tl.sum(a_i[:, None] * t_inv, axis=0))
        t_inv = tl.where(rows[:, None] == i, t_i[None, :], t_inv)
    w = tl.dot(t_inv, k * (beta * tl.exp(gsum))[:, None], input_precision=PRECISION)
    tl.store(w_ptr + toks[:, None] * stride_qt + head * stride_qh + krows[None, :], w, mask=k_tile)
    v = tl.load(v_ptr + toks[:, None] * stride_vt + head * stride_vh + vcols[None, :], mask=v_tile,
                other=0.0).to(tl.float32)
    u = tl.dot(t_inv, v * beta[:, None], input_precision=PRECISION)
    tl.store(u_ptr + toks[:, None] * stride_ut + head * stride_uh + vcols[None, :], u, mask=v_tile)


@triton.jit
def _chunk_state_kernel(
    q_ptr, k_ptr, w_ptr, u_ptr, gcum_ptr, state_ptr, out_ptr, qsl_ptr, slot_ptr, init_ptr, ids_ptr,
    dk, dv, stride_qt, stride_qh, stride_gt, stride_ot, stride_oh, stride_ss, stride_sh, stride_sk,
    C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.load(ids_ptr + tl.program_id(0))
    head = tl.program_id(1)
    vcols = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    krows = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, C)
    k_ok = krows < dk
    v_ok = vcols < dv
    start = tl.load(qsl_ptr + seq)
    end = tl.load(qsl_ptr + seq + 1)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    initial = tl.load(init_ptr + seq) != 0
    s_ptrs = state_ptr + slot * stride_ss + head * stride_sh + krows[:, None] * stride_sk + vcols[None, :]
    tile = k_ok[:, None] & v_ok[None, :]
    s = tl.load(s_ptrs, mask=tile & initial, other=0.0).to(tl.float32)
    causal = rows[:, None] >= rows[None, :]
    for first in range(start, end, C):
        toks = first + rows
        ok = toks < end
        k_tile = ok[:, None] & k_ok[None, :]
        v_tile = ok[:, None] & v_ok[None, :]
        qk_off = toks[:, None] * stride_qt + head * stride_qh + krows[None, :]
        glast = tl.load(gcum_ptr + (tl.minimum(first + C, end) - 1) * stride_gt + head)
        # rows past the sequence's end: G stays at its last value, so no decay there exceeds 1
        gsum = tl.load(gcum_ptr + toks * stride_gt + head, mask=ok, other=0.0)
        gsum = tl.where(ok, gsum, glast)
        # Each [C, k_dim] tile is loaded where it is used, so fewer are live at once (registers).
        w = tl.load(w_ptr + qk_off, mask=k_tile, other=0.0)
        u = tl.load(u_ptr + toks[:, None] * stride_ot + head * stride_oh + vcols[None, :], mask=v_tile, other=0.0)
        vals = u - tl.dot(w, s, input_precision=PRECISION)  # what the chunk's tokens write
        q = tl.load(q_ptr + qk_off, mask=k_tile, other=0.0)
        out = tl.exp(gsum)[:, None] * tl.dot(q, s, input_precision=PRECISION)
        k = tl.load(k_ptr + qk_off, mask=k_tile, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores = tl.where(causal, scores * tl.exp(tl.where(causal, gsum[:, None] - gsum[None, :], 0.0)), 0.0)
        out += tl.dot(scores, vals, input_precision=PRECISION)
        tl.store(out_ptr + toks[:, None] * stride_ot + head * stride_oh + vcols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=v_tile)
        k_decayed = k * tl.exp(glast - gsum)[:, None]
        s = tl.exp(glast) * s + tl.dot(tl.trans(k_decayed), vals, input_precision=PRECISION)
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=tile)


def _split(batch: StateBatch, chunked_from: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """The step's sequences of `chunked_from` tokens or more (chunked) and the rest (token by token),
    and the chunked ones' chunks: [start, end) token rows, CHUNK tokens each but a sequence's last."""
    qsl = batch.query_start_loc_host
    long: list[int] = []
    short: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    for i in range(len(qsl) - 1):
        a, b = qsl[i], qsl[i + 1]
        if b - a >= chunked_from:
            long.append(i)
            starts += range(a, b, CHUNK)
            ends += [min(c + CHUNK, b) for c in range(a, b, CHUNK)]
        else:
            short.append(i)
    return long, short, starts, ends


def gated_delta_rule_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                            beta: torch.Tensor, state: torch.Tensor, batch: StateBatch,
                            chunked_from: int = CHUNK, block_v: int = 64, chunk_block_v: int = 32,
                            chunk_warps: int = 4, prep_warps: int = 8) -> torch.Tensor:
    """Sequences of `chunked_from` tokens or more take the chunked form, the rest go token by token
    (bench/kernels_gated_delta.py sets it, and the tile sizes, to compare). A decode step (CUDA graphs
    included) has no long sequence: it runs the token-by-token kernel alone, with no upload."""
    num_tokens, heads, dk = q.shape
    dv = v.shape[-1]
    qn, kn = normalize_qk(q, k)  # contiguous float32 [T, H, dk]
    g, beta = g.float().contiguous(), beta.float().contiguous()
    assert v.stride(2) == 1 and state.is_contiguous()
    out = torch.empty(num_tokens, heads, dv, dtype=v.dtype, device=v.device)
    block_v = min(block_v, triton.next_power_of_2(dv))
    strides = (state.stride(0), state.stride(1), state.stride(2))
    qsl = batch.query_start_loc_host
    has_long = any(b - a >= chunked_from for a, b in itertools.pairwise(qsl))
    long, short, starts, ends = _split(batch, chunked_from) if has_long else ([], [], [], [])
    short_ids = batch.slots  # unread without ids
    if long:  # one upload: the long sequences, the short ones, the chunks' starts and ends
        ids = torch.tensor(long + short + starts + ends, dtype=torch.int32).to(q.device, non_blocking=True)
        n, m, c = len(long), len(short), len(starts)
        short_ids = ids[n : n + m]
        _chunked(qn, kn, v, g, beta, state, out, batch, ids[:n], ids[n + m : n + m + c], ids[n + m + c :],
                 chunk_block_v, chunk_warps, prep_warps, strides)
    if not long or short:
        grid = (len(short) if long else batch.slots.shape[0], heads, triton.cdiv(dv, block_v))
        _gated_delta_kernel[grid](
            qn, kn, v, g, beta, state, out, batch.query_start_loc, batch.slots, batch.has_initial, short_ids,
            heads, dk, dv, qn.stride(0), qn.stride(1), v.stride(0), v.stride(1), g.stride(0), out.stride(0),
            out.stride(1), *strides,
            BLOCK_K=triton.next_power_of_2(dk), BLOCK_V=block_v, HAS_IDS=bool(long),
        )
    return out


def _chunked(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
             state: torch.Tensor, out: torch.Tensor, batch: StateBatch, seq_ids: torch.Tensor,
             chunk_starts: torch.Tensor, chunk_ends: torch.Tensor, block_v: int, num_warps: int, prep_warps: int,
             strides: tuple[int, int, int]) -> None:
    """The chunked form for the sequences `seq_ids`, whose chunks are given. Scratch in float32: G
    [T, H], W like q, U like the output (rows of the other sequences unused).

    Tiling for an H100 / H200 block (227 KB of shared memory), checked by compiling for sm_90
    (tests/kernels/test_compile_sm90.py; bench/kernel_resources.py prints the figures): at 128 x 128
    heads the state kernel first asked 263 KB (a [128, 64] state block, three [64, 128] float32 tiles
    pipelined over 3 stages, FMA products holding whole rows in registers). Now each program keeps a
    [k_dim, 32] slice of the state (four programs per head at 128 value dims), its loop is not
    pipelined (each chunk needs the state the previous one left, so prefetching buys little), and
    the products run on tensor cores as 3xTF32 (float32 accuracy to about 1e-6): 80 KB. The
    interpreter tests prove it exact; it has not run on a GPU yet, which a GPU session must do
    before SLOTH_GATED_DELTA_CHUNKED goes on by default (gated_delta.gated_delta_rule)."""
    num_tokens, heads, dk = qn.shape
    dv = v.shape[-1]
    block_k = max(16, triton.next_power_of_2(dk))  # tl.dot wants 16 or more on each side
    block_v = max(16, block_v)
    gcum = torch.empty(num_tokens, heads, dtype=torch.float32, device=qn.device)
    w = torch.empty_like(qn)
    u = torch.empty(num_tokens, heads, dv, dtype=torch.float32, device=qn.device)
    _chunk_prep_kernel[(chunk_starts.shape[0], heads)](
        kn, v, g, beta, chunk_starts, chunk_ends, gcum, w, u,
        dk, dv, qn.stride(0), qn.stride(1), v.stride(0), v.stride(1), g.stride(0), u.stride(0), u.stride(1),
        C=CHUNK, BLOCK_K=block_k, BLOCK_DV=max(16, triton.next_power_of_2(dv)), PRECISION=PRECISION,
        num_warps=prep_warps,
    )
    _chunk_state_kernel[(seq_ids.shape[0], heads, triton.cdiv(dv, block_v))](
        qn, kn, w, u, gcum, state, out, batch.query_start_loc, batch.slots, batch.has_initial, seq_ids,
        dk, dv, qn.stride(0), qn.stride(1), g.stride(0), u.stride(0), u.stride(1), *strides,
        C=CHUNK, BLOCK_K=block_k, BLOCK_V=block_v, PRECISION=PRECISION, num_warps=num_warps, num_stages=1,
    )
