"""Attention of the Qwen-VL vision encoders (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) over packed
images: every image (and, in Qwen2.5-VL's windowed blocks, every window of about 64 patches) attends
only to itself. transformers runs that as one attention call per image or window, layer after
layer unless the implementation is a flash-style one, to which it passes the bounds (`cu_seqlens`)
instead. A 1024x1024 image has about 90 windows: some 2,500 small calls in a 7B's encoder, each a
launch and a host-side split. Here the windows of equal length (all but the edges) go through one
batched scaled_dot_product_attention call per length: the same products per window, a handful of
launches per layer. Registered with transformers' AttentionInterface under a name containing
"flash", which is what makes those encoders pass the bounds."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .families import VISION_ARCHITECTURES

VARLEN_IMPLEMENTATION = "sloth_flash_varlen"
# The image-text models whose vision encoders take packed bounds from a flash-style implementation:
# the Qwen-VL ones among those served with their encoder
VARLEN_ENCODERS = frozenset(arch for arch, model_type in VISION_ARCHITECTURES.items() if model_type.startswith("qwen"))

Groups = list[tuple[int, torch.Tensor]]  # (length, token indices [windows of that length, length])
_groups_of: list[tuple[torch.Tensor, Groups]] = []  # the bounds of the encoder pass in progress (two kinds)


def window_groups(cu_seqlens: torch.Tensor) -> Groups:
    """The windows by length: each length's windows' token indices. Read on the host once per bounds
    tensor (an encoder pass passes the same two tensors to every layer)."""
    for bounds, groups in _groups_of:
        if bounds is cu_seqlens:
            return groups
    cuts = cu_seqlens.tolist()
    starts: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(cuts):
        if end > start:
            starts.setdefault(end - start, []).append(start)
    device = cu_seqlens.device
    groups = [(length, (torch.tensor(first, device=device)[:, None] + torch.arange(length, device=device)))
              for length, first in starts.items()]
    del _groups_of[:-1]  # the window bounds and the whole-image bounds of one pass are kept
    _groups_of.append((cu_seqlens, groups))
    return groups


def varlen_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """q/k/v [1, heads, tokens, dim], non-causal, each window of `cu_seq_lens_q` over itself ->
    [1, tokens, heads, dim]. Without bounds, transformers' SDPA attention."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,  # type: ignore[no-any-return]
                                      dropout=dropout, **kwargs)
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("packed vision attention needs the same bounds for queries and keys")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    if k.shape[1] != q.shape[1]:  # grouped heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    for length, index in window_groups(cu_seq_lens_q):
        rows = index.reshape(-1)
        windows = index.shape[0]
        qw, kw, vw = (t[rows].view(windows, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        part = F.scaled_dot_product_attention(qw, kw, vw, scale=scaling)  # [windows, heads, length, dim]
        out[rows] = part.transpose(1, 2).reshape(windows * length, q.shape[1], -1)
    return out.unsqueeze(0), None


AttentionInterface.register(VARLEN_IMPLEMENTATION, varlen_attention_forward)


def use_varlen_attention(hf: nn.Module) -> bool:
    """Point a Qwen-VL vision encoder at the packed attention above; False for other models."""
    if type(hf).__name__ not in VARLEN_ENCODERS:
        return False
    visual: Any = getattr(hf, str(hf.base_model_prefix)).visual
    visual.config._attn_implementation = VARLEN_IMPLEMENTATION
    return True
