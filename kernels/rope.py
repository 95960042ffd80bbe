"""Rotary position embeddings: neox/Llama layout (rotate the two halves of the rotary dims) or, with
`interleaved`, GPT-J's (rotate pairs of neighbours: dims 2i and 2i + 1 by frequency i, as GLM does).
The tables (every scaling type) come from `rope_scaling`; tables narrower than the head (partial
rotary, Phi-4-mini, GLM) rotate its first 2 x width dims only. Dispatch: Triton (`triton_rope`, in
place) on CUDA tensors, the PyTorch reference elsewhere."""

from __future__ import annotations

import torch

from .rope_scaling import rope_cos_sin, rope_inv_freq, rope_tables

__all__ = ["apply_rope", "apply_rope_ref", "rope_cos_sin", "rope_inv_freq", "rope_tables"]


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    interleaved: bool = False, fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D]; returns rotated copies in the input dtype. cos / sin [rows, R / 2]
    rotate the first R dims of each head (R = D: all of it) and pass the rest through. The tables are
    rounded to the input dtype; products and sums are too, as transformers computes them, or with
    `fp32` kept in float32 and rounded once at the end (Cohere)."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    half = cos.shape[-1]
    assert 2 * half <= q.shape[-1], f"rotary tables of width {half} for heads of {q.shape[-1]} dims"

    def rotate(x: torch.Tensor) -> torch.Tensor:
        # transformers multiplies in the activation dtype; match it so greedy outputs agree.
        rest, dtype = x[..., 2 * half :], x.dtype
        cc, ss = c.to(dtype), s.to(dtype)
        if fp32:
            x, cc, ss = x.float(), cc.float(), ss.float()
        if interleaved:
            pairs = x[..., : 2 * half].unflatten(-1, (half, 2))
            x1, x2 = pairs[..., 0], pairs[..., 1]
            rotated = torch.stack((x1 * cc - x2 * ss, x2 * cc + x1 * ss), dim=-1).flatten(-2)
            return torch.cat((rotated.to(dtype), rest), dim=-1)
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        return torch.cat(((x1 * cc - x2 * ss).to(dtype), (x2 * cc + x1 * ss).to(dtype), rest), dim=-1)

    return rotate(q), rotate(k)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    interleaved: bool = False, fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k). On CUDA q and k are rotated in place: use the returned tensors."""
    if q.is_cuda:
        from .triton_rope import apply_rope_triton

        return apply_rope_triton(q, k, positions, cos, sin, interleaved, fp32)
    return apply_rope_ref(q, k, positions, cos, sin, interleaved, fp32)
