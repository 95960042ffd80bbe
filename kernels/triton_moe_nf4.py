"""Grouped expert GEMMs over NF4 experts (sloth_kernels.moe_nf4_format.GroupedNF4) in Triton: the assignments are
sorted by expert on the device as for 16-bit experts (`triton_moe.align_by_expert`, no host sync, so
CUDA graphs capture it); one launch computes every expert's silu(gate) * up, one more its down
projection scaled by the routing weight, each weight tile decoded from the packed NF4 bytes in
registers to exactly bitsandbytes' values; expert LoRA adds its deltas inside those launches
(triton_moe_lora). Reference: sloth_kernels.moe_nf4.moe_experts_nf4_ref."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_lora import MoELoRA
from .moe_nf4_format import GroupedNF4
from .triton_moe import Assignments

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def supports(x: torch.Tensor, *ws: GroupedNF4) -> bool:
    """Activations of a 16/32-bit float dtype, each expert's weight indexable in int32."""
    return x.dtype in _TL_DTYPE and all(w.dtype in _TL_DTYPE and w.shape[0] * w.shape[1] < 2**31 for w in ws)


@triton.jit
def _nf4_tile(data_ptr, absmax_ptr, s2_ptr, off_ptr, code_ptr, code2_ptr, expert, offs_n, offs_k, mask,
              K: tl.constexpr, stride_de, stride_ae, stride_se, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
              BLOCKSIZE2: tl.constexpr, W_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr):
    """W[e][n, k] for the tile [BLOCK_K, BLOCK_N]: code[nibble] * absmax[block], rounded to the
    weight's dtype as bitsandbytes dequantizes (high nibble first), then to the activations' dtype."""
    e = expert.to(tl.int64)
    idx = offs_n[None, :] * K + offs_k[:, None]  # int32 within one expert's weight (see supports)
    byte = tl.load(data_ptr + e * stride_de + idx // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble)
    block = idx // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + e * stride_ae + block, mask=mask, other=0).to(tl.int32)
        s2 = tl.load(s2_ptr + e * stride_se + block // BLOCKSIZE2, mask=mask, other=0.0)
        scale = tl.load(code2_ptr + q) * s2 + tl.load(off_ptr + e)
    else:
        scale = tl.load(absmax_ptr + e * stride_ae + block, mask=mask, other=0.0)
    return (value * scale).to(W_DTYPE).to(A_DTYPE)


@triton.jit
def _grouped_gemm_nf4(a_ptr, c_ptr, rows_ptr, block_expert_ptr, scale_ptr, delta_ptr, stride_dm,
                      g_data, g_absmax, g_s2, g_off, u_data, u_absmax, u_s2, u_off, code_ptr, code2_ptr,
                      N, K: tl.constexpr, num_rows, a_row_div, stride_am, stride_de, stride_ae, stride_se, stride_cm,
                      GATED: tl.constexpr, SCALED: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                      BLOCKSIZE2: tl.constexpr, W_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DELTA: tl.constexpr = False):
    """C[row] = A[row // a_row_div] @ G[e].T for the rows of one expert's block; GATED: C =
    silu(A @ G[e].T) * (A @ U[e].T); DELTA: each product gains delta[row] (expert LoRA: gate
    columns, then up columns) before that; SCALED: C *= scale[row]. Rounded where the reference rounds."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_rows
    a_rows = tl.where(row_ok, rows // a_row_div, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    out_dtype = c_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        w = _nf4_tile(g_data, g_absmax, g_s2, g_off, code_ptr, code2_ptr, expert, offs_n, offs_k, w_mask, K,
                      stride_de, stride_ae, stride_se, NESTED, BLOCKSIZE, BLOCKSIZE2, W_DTYPE, out_dtype)
        acc += tl.dot(a, w, input_precision=PRECISION)
        if GATED:
            wu = _nf4_tile(u_data, u_absmax, u_s2, u_off, code_ptr, code2_ptr, expert, offs_n, offs_k, w_mask, K,
                           stride_de, stride_ae, stride_se, NESTED, BLOCKSIZE, BLOCKSIZE2, W_DTYPE, out_dtype)
            acc_up += tl.dot(a, wu, input_precision=PRECISION)
    y = acc.to(out_dtype).to(tl.float32)
    d_base = delta_ptr + tl.where(row_ok, rows, 0).to(tl.int64)[:, None] * stride_dm
    d_mask = row_ok[:, None] & n_ok[None, :]
    if DELTA:
        y = (y + tl.load(d_base + offs_n[None, :], mask=d_mask, other=0.0).to(tl.float32)).to(out_dtype).to(tl.float32)
    if GATED:
        up = acc_up.to(out_dtype).to(tl.float32)
        if DELTA:
            up = up + tl.load(d_base + (offs_n + N)[None, :], mask=d_mask, other=0.0).to(tl.float32)
            up = up.to(out_dtype).to(tl.float32)
        y = (y / (1.0 + tl.exp(-y))).to(out_dtype).to(tl.float32) * up
    if SCALED:
        y = y * tl.load(scale_ptr + tl.where(row_ok, rows, 0), mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, y.to(out_dtype), mask=row_ok[:, None] & n_ok[None, :])


def _launch(a: torch.Tensor, c: torch.Tensor, rows: torch.Tensor, block_expert: torch.Tensor, scale: torch.Tensor,
            g: GroupedNF4, u: GroupedNF4, a_row_div: int, gated: bool, block_m: int,
            delta: torch.Tensor | None = None) -> None:
    n_out, k = g.shape
    nested = g.state2_absmax is not None
    s2 = g.state2_absmax if g.state2_absmax is not None else g.absmax  # placeholders when not nested
    us2 = u.state2_absmax if u.state2_absmax is not None else u.absmax
    code2 = g.state2_code if g.state2_code is not None else g.code
    block_n, block_k = 64, 64
    grid = (block_expert.numel(), triton.cdiv(n_out, block_n))
    _grouped_gemm_nf4[grid](
        a, c, rows, block_expert, scale, c if delta is None else delta, 0 if delta is None else delta.stride(0), g.data, g.absmax, s2, g.offset if nested else g.code, u.data, u.absmax, us2,
        u.offset if nested else u.code, g.code, code2, n_out, k, c.shape[0], a_row_div, a.stride(0),
        g.data.stride(0), g.absmax.stride(0), s2.stride(0), c.stride(0),
        GATED=gated, SCALED=not gated, NESTED=nested, BLOCKSIZE=g.blocksize, BLOCKSIZE2=g.state2_blocksize,
        W_DTYPE=_TL_DTYPE[g.dtype], PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DELTA=delta is not None)


def fused_moe_nf4(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: GroupedNF4, up: GroupedNF4,
                  down: GroupedNF4, block_m: int | None = None, lora: MoELoRA | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, k]: two launches
    (with `lora`, each projection gains its tokens' expert LoRA: two more launches each)."""
    num_tokens, _ = x.shape
    inter, hidden = gate.shape
    x = x.contiguous()
    sort = Assignments(ids, gate.num_experts, block_m, lora)
    n, top_k, rows, block_expert, block_m = sort.n, sort.top_k, sort.rows, sort.block_expert, sort.block_m
    h = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    _launch(x, h, rows, block_expert, weights, gate, up, top_k, True, block_m, sort.delta("gate_up", x, top_k))
    y = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
    _launch(h, y, rows, block_expert, weights.reshape(-1).contiguous(), down, down, 1, False, block_m,
            sort.delta("down", h, 1))
    # Each token's top_k results summed in float32 and rounded once.
    return y.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
