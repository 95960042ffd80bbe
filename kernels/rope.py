"""Rotary position embeddings (neox/Llama layout: rotate the two halves), with llama3 scaling.
Dispatch: Triton (`triton_rope`, in place) on CUDA tensors, the PyTorch reference elsewhere."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies, adjusted the way transformers does for `rope_type: llama3`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in ("default", None):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim // 2] in float32."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    return freqs.cos(), freqs.sin()


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D]; returns rotated copies in the input dtype."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        # transformers multiplies in the activation dtype; match it so greedy outputs agree.
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        cc, ss = c.to(x.dtype), s.to(x.dtype)
        return torch.cat((x1 * cc - x2 * ss, x2 * cc + x1 * ss), dim=-1)

    return rotate(q), rotate(k)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k). On CUDA q and k are rotated in place: use the returned tensors."""
    if q.is_cuda:
        from kernels.triton_rope import apply_rope_triton

        return apply_rope_triton(q, k, positions, cos, sin)
    return apply_rope_ref(q, k, positions, cos, sin)
