"""RoPE frequency scaling (linear, llama3, YaRN, longrope, dynamic NTK) computed as transformers does,
and the float32 cos/sin tables the forward pass reads, attention factor folded in.
`scaling` is the normalized dict `sloth_serve.models.config.rope_parameters` returns."""

from __future__ import annotations

import math
from typing import Any

import torch

# Types whose frequencies depend on how long the sequence is (transformers recomputes them per call).
POSITION_DEPENDENT = ("longrope", "dynamic")


def _exponents(head_dim: int) -> torch.Tensor:
    return torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim


def _default(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** _exponents(head_dim))


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(head_dim: int, theta: float, s: dict[str, Any]) -> torch.Tensor:
    """Blend of interpolated (divided by factor) and original frequencies: dimensions that turn
    fewer than beta_slow times over the original context are interpolated, more than beta_fast
    times kept, a linear ramp between (the YaRN paper, section 3.2)."""
    factor, orig = float(s["factor"]), float(s["original_max_position_embeddings"])

    def dim_of(rotations: float) -> float:  # the dimension index that turns `rotations` times over orig
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s["beta_fast"]), dim_of(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency per dimension
    pos_freqs = theta ** _exponents(head_dim)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _longrope(head_dim: int, theta: float, factors: list[float]) -> torch.Tensor:
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta ** _exponents(head_dim))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2]. For longrope these are the short factors' and for
    dynamic the unscaled ones: what transformers uses while a sequence fits the original context."""
    inv_freq = _default(head_dim, theta)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in ("default", None):
        return inv_freq
    assert scaling is not None
    if rope_type == "dynamic":  # the NTK formula at the original length: a base factor of (nearly) 1
        factor, orig = float(scaling["factor"]), int(scaling["original_max_position_embeddings"])
        return 1.0 / ((theta * (factor * orig / orig - (factor - 1)) ** (head_dim / (head_dim - 2))) ** _exponents(head_dim))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    if rope_type == "yarn":
        return _yarn(head_dim, theta, scaling)
    if rope_type == "longrope":
        return _longrope(head_dim, theta, scaling["short_factor"])
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported "
                     "(supported: default, linear, llama3, yarn, longrope, dynamic)")


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim // 2] in float32."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    return freqs.cos(), freqs.sin()


def _dynamic_inv_freq(head_dim: int, theta: float, factor: float, orig: int, seq_lens: torch.Tensor) -> torch.Tensor:
    """[len(seq_lens), head_dim // 2]: the NTK-enlarged base for each sequence length past `orig`,
    in float32 as transformers computes it from its tensor `seq_len`."""
    scale = factor * seq_lens / orig - (factor - 1)
    # transformers raises one 0-d tensor at a time, which rounds like this (the vectorized float32
    # pow of many lengths at once can land one ulp away).
    base = theta * (scale.double() ** (head_dim / (head_dim - 2))).float()
    return 1.0 / (base[:, None] ** _exponents(head_dim)[None, :])


def rope_tables(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [rows, head_dim // 2] in float32, times the attention factor (transformers
    multiplies both by it). Row p serves position p; longrope appends rows for `rope_rows`:
    row max_positions + p is position p < original length with the long factors."""
    s = scaling or {}
    rope_type = s.get("rope_type", "default")
    if rope_type == "longrope":
        orig = int(s["original_max_position_embeddings"])
        short, long = _longrope(head_dim, theta, s["short_factor"]), _longrope(head_dim, theta, s["long_factor"])
        t = torch.arange(max_positions, dtype=torch.float32)
        # transformers uses the long factors once the sequence is longer than `orig`: position p
        # decoded alone (sequence length p + 1) takes them from p = orig on.
        inv = torch.where((t >= orig)[:, None], long, short)
        freqs = torch.cat([t[:, None] * inv, torch.outer(t[: min(orig, max_positions)], long)])
    elif rope_type == "dynamic":
        orig = int(s["original_max_position_embeddings"])
        t = torch.arange(max_positions, dtype=torch.float32)
        inv = _dynamic_inv_freq(head_dim, theta, float(s["factor"]), orig,
                                torch.arange(orig + 1, max(max_positions, orig) + 1, dtype=torch.int64))
        # Rows below `orig` keep the unscaled frequencies; row p past it the base for length p + 1,
        # what transformers uses when position p is decoded alone.
        below = torch.outer(t[:orig], rope_inv_freq(head_dim, theta, s))
        freqs = torch.cat([below, t[orig:, None] * inv[: max(max_positions - orig, 0)]])
    else:
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(head_dim, theta, s))
    factor = attention_factor(s)
    return freqs.cos() * factor, freqs.sin() * factor


def attention_factor(s: dict[str, Any]) -> float:
    """The factor transformers multiplies cos and sin by (the YaRN / longrope attention temperature)."""
    rope_type = s.get("rope_type", "default")
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"]) if rope_type in ("yarn", "longrope") else 1.0
    factor = float(s.get("factor") or 1.0)
    if rope_type == "yarn":
        def mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        if s.get("mscale") and s.get("mscale_all_dim"):
            return float(mscale(s["mscale"]) / mscale(s["mscale_all_dim"]))
        return mscale(1.0)
    if rope_type == "longrope" and factor > 1.0:
        return math.sqrt(1 + math.log(factor) / math.log(s["original_max_position_embeddings"]))
    return 1.0


def long_prompt_threshold(scaling: dict[str, Any] | None) -> int | None:
    """For longrope, the prompt length past which every token of the prompt takes the long factors
    (transformers picks them for a whole forward pass longer than the original context); else None."""
    if not scaling or scaling.get("rope_type") != "longrope":
        return None
    return int(scaling["original_max_position_embeddings"])


def rope_rows(
    scaling: dict[str, Any] | None, max_positions: int, num_prompt_tokens: int, start: int, end: int
) -> range | list[int]:
    """The `rope_tables` rows of positions [start, end) of a sequence with that prompt length. Only
    a longrope prompt longer than the original context reads other rows than its positions: its
    positions below that length use the long-factor rows appended past `max_positions`."""
    orig = long_prompt_threshold(scaling)
    if orig is None or num_prompt_tokens <= orig or start >= orig:
        return range(start, end)
    split = min(end, orig)
    return [*range(max_positions + start, max_positions + split), *range(split, end)]
