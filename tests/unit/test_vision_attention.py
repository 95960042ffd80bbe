"""The packed attention of the Qwen-VL vision encoders (server/models/vision_attention.py): windows
of equal length batched into one call give what transformers' one call per window gives, for
windows of several lengths, grouped heads and a single whole image; a Qwen2.5-VL loaded by the
server runs its encoder through it (its tokens against transformers: tests/engine/test_vision.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sloth_serve.models.vision_attention import (
    VARLEN_IMPLEMENTATION,
    use_varlen_attention,
    varlen_attention_forward,
)


def per_window(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """transformers' way without a flash implementation: one SDPA call per window."""
    module = nn.Module()
    module.is_causal = False  # type: ignore[assignment]
    module.num_key_value_groups = query.shape[1] // key.shape[1]  # type: ignore[assignment]
    lengths = (cu[1:] - cu[:-1]).tolist()
    parts = [sdpa_attention_forward(module, q, k, v, None, scaling=scaling, is_causal=False)[0]
             for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value)), strict=True)]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize(("bounds", "kv_heads"), [
    ([0, 64, 128, 160, 224, 240, 304], 4),  # windows of 64, 32 and 16 tokens, mixed in order
    ([0, 37], 4),  # one whole image
    ([0, 16, 16, 48, 64], 2),  # an empty window; grouped heads
])
def test_windows_batched_by_length_match_one_call_per_window(bounds: list[int], kv_heads: int) -> None:
    torch.manual_seed(0)
    tokens, heads, dim = bounds[-1], 4, 16
    query = torch.randn(1, heads, tokens, dim)
    key, value = torch.randn(1, kv_heads, tokens, dim), torch.randn(1, kv_heads, tokens, dim)
    cu = torch.tensor(bounds, dtype=torch.int32)
    ours, _ = varlen_attention_forward(nn.Module(), query, key, value, None, scaling=dim**-0.5,
                                       cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert ours.shape == (1, tokens, heads, dim)
    torch.testing.assert_close(ours, per_window(query, key, value, cu, dim**-0.5), rtol=1e-5, atol=1e-6)


def test_a_served_qwen2_5_vl_encoder_uses_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vision_models import make_qwen2_5_vl

    _, hf = make_qwen2_5_vl(tmp_path / "model")
    assert use_varlen_attention(hf)
    assert hf.model.visual.config._attn_implementation == VARLEN_IMPLEMENTATION
    assert hf.model.language_model.config._attn_implementation != VARLEN_IMPLEMENTATION
    assert not use_varlen_attention(nn.Linear(2, 2))
