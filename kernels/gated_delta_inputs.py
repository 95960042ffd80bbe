"""What both forms of the gated delta rule agree on: the prompt length from which the chunked form
runs (CHUNK, also its chunk length) and the q/k normalization. Ground floor of the gated delta
kernels: the references (gated_delta.py) and the Triton kernels (triton_gated_delta.py) both read
it, and it imports neither."""

from __future__ import annotations

import torch

CHUNK = 64  # prompts at least this long take the chunked form (CPU and GPU)


def normalize_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 q and k, L2-normalized over the head dim (eps 1e-6 inside the root), q times k_dim^-0.5."""
    q, k = q.float(), k.float()
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * q.shape[-1] ** -0.5
    return q, k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
