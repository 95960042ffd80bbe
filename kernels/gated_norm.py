"""Mamba-2's gated RMSNorm: y = rmsnorm(x * silu(z)) (Granite 4, Mamba-2 layout) or rmsnorm(x) * silu(z)
(`norm_before_gate`, Falcon-H1's default), normalised over groups of `group_size` channels (Falcon-H1:
mamba_n_groups groups; Granite 4: the whole width). Float32 throughout, one rounding at the end.
Dispatch: Triton (`triton_gated_norm`) on CUDA tensors, the PyTorch reference elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rms_norm_ref(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                       group_size: int, norm_before_gate: bool = False) -> torch.Tensor:
    """x, gate [T, D]; weight [D]; D a multiple of group_size. Returns [T, D] in x's dtype."""
    xf, zf = x.float(), F.silu(gate.float())
    if not norm_before_gate:
        xf = xf * zf
    grouped = xf.unflatten(-1, (-1, group_size))
    xf = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if norm_before_gate:
        xf = xf * zf
    return xf.to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int, norm_before_gate: bool = False) -> torch.Tensor:
    if x.is_cuda:
        from .triton_gated_norm import gated_rms_norm_triton

        return gated_rms_norm_triton(x, gate, weight, eps, group_size, norm_before_gate)
    return gated_rms_norm_ref(x, gate, weight, eps, group_size, norm_before_gate)
