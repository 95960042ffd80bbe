"""Grouped expert GEMMs for a mixture-of-experts layer in Triton: the (token, expert) assignments
are sorted by expert and padded to whole row blocks on the device (`align_by_expert`, no host sync,
static shapes: CUDA-graph safe); one launch computes every expert's silu(gate) * up, one more its
down projection scaled by the routing weight; expert LoRA (triton_moe_lora) adds its deltas inside
those launches. Reference: sloth_kernels.moe.moe_experts_ref (with LoRA: moe.moe_experts_lora_ref)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_lora import MoELoRA


def supports(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    return (x.dtype in (torch.float16, torch.bfloat16, torch.float32) and w_gate_up.dtype == x.dtype
            and w_down.dtype == x.dtype and w_gate_up.is_contiguous() and w_down.is_contiguous())


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [P] int32, block_expert [P / block_m] int32). `rows` lists the assignments a = token *
    top_k + slot grouped by expert, each expert's group padded to a multiple of block_m with the
    sentinel T * top_k; block_expert[b] is the expert of rows[b * block_m:][:block_m] (-1: unused
    block). P is the worst case for this many tokens, so the shapes never depend on the routing."""
    flat = ids.reshape(-1)
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync to size its output
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(n, device=ids.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    num_blocks = -(-(n + min(num_experts, n) * (block_m - 1)) // block_m)
    rows = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=ids.device)
    rows[(padded_end - padded)[expert_of] + rank] = order.to(torch.int32)
    starts = torch.arange(num_blocks, device=ids.device) * block_m
    block_expert = torch.searchsorted(padded_end, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return rows, block_expert


@triton.jit
def _clamped_swiglu(gate, up, out_dtype, limit, ALPHA: tl.constexpr):
    """gpt-oss: (clamp(up, -limit, limit) + 1) * g * sigmoid(ALPHA * g), g = min(gate, limit), rounded
    to the activation dtype after each operation as transformers computes it."""
    g = tl.minimum(gate, limit)
    u = tl.minimum(tl.maximum(up, -limit), limit)
    sig = (1.0 / (1.0 + tl.exp(-(g * ALPHA).to(out_dtype).to(tl.float32)))).to(out_dtype).to(tl.float32)
    glu = (g * sig).to(out_dtype).to(tl.float32)
    return ((u + 1.0).to(out_dtype).to(tl.float32) * glu).to(out_dtype).to(tl.float32)


@triton.jit
def _grouped_gemm(a_ptr, w_ptr, c_ptr, rows_ptr, block_expert_ptr, scale_ptr, bias_ptr, delta_ptr, N,
                  K: tl.constexpr, num_rows, a_row_div, stride_am, stride_we, stride_wn, stride_wk, stride_be,
                  stride_dm, stride_cm, gate_step, up_offset, limit,
                  GATED: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BIAS: tl.constexpr = False, CLAMPED: tl.constexpr = False, DELTA: tl.constexpr = False):
    """C[row] = A[row // a_row_div] @ W[e].T for the rows of one expert's block (W[e][n, k] at
    n * stride_wn + k * stride_wk). GATED: gate output j is W[e] row j * gate_step, up output j row
    j * gate_step + up_offset (gate rows then up rows: 1, N; gpt-oss's interleaved columns: 2, 1) and
    C = silu(gate) * up, or with CLAMPED gpt-oss's clamped SwiGLU; BIAS: bias[e] (indexed like W's
    rows) is added after the product is rounded; DELTA: delta[row] (the row's expert LoRA,
    triton_moe_lora, indexed like W's rows) is added after that, rounded again; SCALED: C *= scale[row]."""
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
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        k_off = offs_k[:, None] * stride_wk
        w = tl.load(w_base + (offs_n * gate_step)[None, :] * stride_wn + k_off, mask=w_mask, other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
        if GATED:
            wu = tl.load(w_base + (offs_n * gate_step + up_offset)[None, :] * stride_wn + k_off, mask=w_mask,
                         other=0.0)
            acc_up += tl.dot(a, wu, input_precision=PRECISION)
    out_dtype = c_ptr.dtype.element_ty
    # Round where the reference (16-bit matmuls, then the activation in 16-bit) rounds.
    y = acc.to(out_dtype).to(tl.float32)
    b_base = bias_ptr + expert.to(tl.int64) * stride_be
    if BIAS:
        y = (y + tl.load(b_base + offs_n * gate_step, mask=n_ok, other=0.0).to(tl.float32)[None, :])
        y = y.to(out_dtype).to(tl.float32)
    d_base = delta_ptr + tl.where(row_ok, rows, 0).to(tl.int64)[:, None] * stride_dm
    d_mask = row_ok[:, None] & n_ok[None, :]
    if DELTA:
        y = (y + tl.load(d_base + (offs_n * gate_step)[None, :], mask=d_mask, other=0.0).to(tl.float32))
        y = y.to(out_dtype).to(tl.float32)
    if GATED:
        up = acc_up.to(out_dtype).to(tl.float32)
        if BIAS:
            up = up + tl.load(b_base + offs_n * gate_step + up_offset, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            up = up.to(out_dtype).to(tl.float32)
        if DELTA:
            up = up + tl.load(d_base + (offs_n * gate_step + up_offset)[None, :], mask=d_mask, other=0.0).to(tl.float32)
            up = up.to(out_dtype).to(tl.float32)
        if CLAMPED:
            y = _clamped_swiglu(y, up, out_dtype, limit, 1.702)
        else:
            y = (y / (1.0 + tl.exp(-y))).to(out_dtype).to(tl.float32) * up
    if SCALED:
        y = y * tl.load(scale_ptr + tl.where(row_ok, rows, 0), mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, y.to(out_dtype), mask=row_ok[:, None] & n_ok[None, :])


def _block_m(num_assignments: int, num_experts: int) -> int:
    # Rows per block near the mean rows per expert: small blocks waste little padding at decode.
    per_expert = num_assignments / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


class Assignments:
    """One layer's (token, expert) assignments sorted by expert (align_by_expert), and each
    projection's expert-LoRA delta over them (None without LoRA there): what the launches share."""

    def __init__(self, ids: torch.Tensor, num_experts: int, block_m: int | None, lora: MoELoRA | None) -> None:
        self.top_k = ids.shape[1]
        self.n = ids.numel()
        self.block_m = block_m or _block_m(self.n, num_experts)
        self.rows, self.block_expert = align_by_expert(ids, num_experts, self.block_m)
        self.lora = lora

    def delta(self, proj: str, inputs: torch.Tensor, a_row_div: int) -> torch.Tensor | None:
        """The rows' LoRA on `proj` of `inputs` (two launches), or None where no adapter has any."""
        table = self.lora.get(proj) if self.lora is not None else None
        if table is None or self.lora is None:
            return None
        from .triton_moe_lora import grouped_lora_delta

        return grouped_lora_delta(inputs, a_row_div, self.top_k, self.n, self.rows, self.block_expert,
                                  self.block_m, self.lora.slots, table)


def fused_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, block_m: int | None = None, lora: MoELoRA | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, k]: two launches
    (with `lora`, each projection gains its tokens' expert LoRA: two more launches each)."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    inter = two_inter // 2
    x = x.contiguous()
    sort = Assignments(ids, num_experts, block_m, lora)
    n, top_k, rows, block_expert, block_m = sort.n, sort.top_k, sort.rows, sort.block_expert, sort.block_m
    h = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    block_n, block_k = 64, 64
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 models: no TF32 rounding
    grid = (block_expert.numel(), triton.cdiv(inter, block_n))
    d = sort.delta("gate_up", x, top_k)
    _grouped_gemm[grid](x, w_gate_up, h, rows, block_expert, weights, weights, h if d is None else d, inter,
                        hidden, n, top_k, x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), 1, 0,
                        0 if d is None else d.stride(0), h.stride(0), 1, inter, 0.0,
                        GATED=True, SCALED=False, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, DELTA=d is not None)
    y = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
    scale = weights.reshape(-1).contiguous()
    grid = (block_expert.numel(), triton.cdiv(hidden, block_n))
    d = sort.delta("down", h, 1)
    _grouped_gemm[grid](h, w_down, y, rows, block_expert, scale, scale, y if d is None else d, hidden, inter, n, 1,
                        h.stride(0), w_down.stride(0), w_down.stride(1), 1, 0, 0 if d is None else d.stride(0),
                        y.stride(0), 1, 0, 0.0,
                        GATED=False, SCALED=True, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, DELTA=d is not None)
    # Each token's top_k results summed in float32 and rounded once.
    return y.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


def fused_moe_gpt_oss(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                      b_gate_up: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, limit: float,
                      block_m: int | None = None, lora: MoELoRA | None = None) -> torch.Tensor:
    """gpt-oss's experts in transformers' layout: w_gate_up [E, hidden, 2 inter] (gate, up columns
    interleaved) + b_gate_up [E, 2 inter], the clamped SwiGLU, w_down [E, inter, hidden] + b_down
    [E, hidden]; weighted by the routing weights and summed per token. Two launches, no host sync
    (with `lora`: its deltas, output columns in the same interleaved order, two more each)."""
    num_tokens, hidden = x.shape
    num_experts, _, two_inter = w_gate_up.shape
    inter = two_inter // 2
    x = x.contiguous()
    sort = Assignments(ids, num_experts, block_m, lora)
    n, top_k, rows, block_expert, block_m = sort.n, sort.top_k, sort.rows, sort.block_expert, sort.block_m
    h = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    block_n, block_k = 64, 64
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = (block_expert.numel(), triton.cdiv(inter, block_n))
    d = sort.delta("gate_up", x, top_k)
    # W[e][n, k] = w_gate_up[e, k, n]: rows of W are columns here (stride 1), k strides by 2 inter.
    _grouped_gemm[grid](x, w_gate_up, h, rows, block_expert, weights, b_gate_up, h if d is None else d, inter,
                        hidden, n, top_k, x.stride(0), w_gate_up.stride(0), w_gate_up.stride(2), w_gate_up.stride(1),
                        b_gate_up.stride(0), 0 if d is None else d.stride(0), h.stride(0), 2, 1, limit,
                        GATED=True, SCALED=False, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, BIAS=True, CLAMPED=True, DELTA=d is not None)
    y = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
    scale = weights.reshape(-1).contiguous()
    grid = (block_expert.numel(), triton.cdiv(hidden, block_n))
    d = sort.delta("down", h, 1)
    _grouped_gemm[grid](h, w_down, y, rows, block_expert, scale, b_down, y if d is None else d, hidden, inter, n, 1,
                        h.stride(0), w_down.stride(0), w_down.stride(2), w_down.stride(1),
                        b_down.stride(0), 0 if d is None else d.stride(0), y.stride(0), 1, 0, 0.0,
                        GATED=False, SCALED=True, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, BIAS=True, DELTA=d is not None)
    return y.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
