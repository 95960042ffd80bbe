"""RMSNorm, optionally fused with the residual add that precedes it in a transformer block, in
Llama's rounding and in Gemma's (`gemma_*`: a float32 scale 1 + w, one rounding at the end).
Dispatch: Triton (`triton_norm`) on CUDA tensors, the PyTorch references elsewhere."""

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
        from .triton_norm import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalises over the last dim; x may be a strided [T, H, D] view (per-head q/k norm)."""
    if x.is_cuda:
        from .triton_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def gemma_rms_norm_ref(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm with `scale` = 1 + w in float32: normalise and scale in float32, then cast
    once (transformers' Gemma2/Gemma3RMSNorm; Llama rounds before scaling)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * scale.float()).to(x.dtype)


def gemma_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    return gemma_rms_norm_ref(x, scale, eps), x


def gemma_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemma_rms_norm(x + residual), x + residual), in x's dtype; scale is float32 1 + w."""
    if x.is_cuda:
        from .triton_norm import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, scale, eps, scale_fp32=True)
    return gemma_add_rms_norm_ref(x, residual, scale, eps)


def gemma_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm over the last dim (x may be a strided [T, H, D] view: per-head q/k norm)."""
    if x.is_cuda:
        from .triton_norm import rms_norm_triton

        return rms_norm_triton(x, scale, eps, scale_fp32=True)
    return gemma_rms_norm_ref(x, scale, eps)
