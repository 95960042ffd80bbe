"""RMSNorm, optionally fused with the residual add that precedes it in a transformer block.
Dispatch: Triton (`triton_norm`) on CUDA tensors, the PyTorch reference elsewhere."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalise in float32, cast back, then scale (same order as transformers)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); with no residual, x itself is the residual."""
    if residual is not None:
        x = x + residual
    return rms_norm_ref(x, weight, eps), x


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns new tensors (normed, x + residual); x and residual are left as they were."""
    if x.is_cuda:
        from kernels.triton_norm import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalises over the last dim; x may be a strided [T, H, D] view (per-head q/k norm)."""
    if x.is_cuda:
        from kernels.triton_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)
