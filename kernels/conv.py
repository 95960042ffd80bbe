"""Causal depthwise 1-D convolution over a flat batch of sequences, with a per-sequence state of the
last K - 1 inputs (LFM2's short convolutions; Mamba's conv1d). A prompt chunk continues from the
state its previous chunk left, so chunked prefill equals one pass; a decode step is a chunk of one.
`silu`: the output goes through SiLU (Qwen3.5's Gated DeltaNet), in float32 before the one rounding.
Dispatch: Triton (`triton_conv`) on CUDA tensors, the PyTorch reference elsewhere."""

from __future__ import annotations

import torch

from .state_batch import StateBatch


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      conv_state: torch.Tensor, batch: StateBatch, silu: bool = False) -> torch.Tensor:
    """out[t] = bias + sum_k weight[:, k] * in[t - (K - 1) + k], where `in` is the sequence's state
    followed by its tokens; then the state becomes the last K - 1 inputs. x [T, D], weight [D, K],
    conv_state [S, D, K - 1] (updated in place). Products summed in float32, rounded once."""
    width = weight.shape[1] - 1
    out = torch.empty_like(x)
    qsl = batch.query_start_loc_host
    for b, (slot, initial) in enumerate(zip(batch.slots_host, batch.has_initial_host, strict=True)):
        start, end = qsl[b], qsl[b + 1]
        prev = conv_state[slot] if initial else conv_state.new_zeros(conv_state.shape[1:])
        full = torch.cat([prev.to(x.dtype), x[start:end].t()], dim=1)  # [D, K - 1 + n]
        y = torch.nn.functional.conv1d(full.float().unsqueeze(0), weight.float().unsqueeze(1),
                                       None if bias is None else bias.float(), groups=x.shape[1])[0]
        if silu:
            y = torch.nn.functional.silu(y)
        out[start:end] = y.t().to(x.dtype)
        conv_state[slot] = full[:, full.shape[1] - width :].to(conv_state.dtype)
    return out


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv_state: torch.Tensor, batch: StateBatch, silu: bool = False) -> torch.Tensor:
    if x.is_cuda:
        from .triton_conv import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, conv_state, batch, silu)
    return causal_conv1d_ref(x, weight, bias, conv_state, batch, silu)
