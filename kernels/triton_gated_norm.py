"""Triton gated RMSNorm (see `gated_norm.gated_rms_norm_ref`): one program per (row, group), the
group's channels in one block, float32 throughout and one rounding at the store."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_norm_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr, group_size, eps, sx, sz, sy,
    NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    ok = tl.arange(0, BLOCK) < group_size
    x = tl.load(x_ptr + t * sx + cols, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + t * sz + cols, mask=ok, other=0.0).to(tl.float32)
    silu = z / (1.0 + tl.exp(-z))
    if not NORM_BEFORE_GATE:
        x = x * silu
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / group_size + eps)
    y = x * rstd * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if NORM_BEFORE_GATE:
        y = y * silu
    tl.store(y_ptr + t * sy + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def gated_rms_norm_triton(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                          group_size: int, norm_before_gate: bool = False) -> torch.Tensor:
    """x and gate may be strided row views (slices of in_proj's output); the channel stride must be 1."""
    num_tokens, dim = x.shape
    assert dim % group_size == 0, f"{dim} channels are not a whole number of groups of {group_size}"
    assert x.stride(1) == 1 and gate.stride(1) == 1 and weight.is_contiguous(), "unit channel strides"
    y = torch.empty((num_tokens, dim), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(group_size)
    _gated_norm_kernel[(num_tokens, dim // group_size)](
        x, gate, weight, y, group_size, eps, x.stride(0), gate.stride(0), y.stride(0),
        NORM_BEFORE_GATE=norm_before_gate, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return y
