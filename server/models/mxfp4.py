"""gpt-oss's original MXFP4 expert weights (`experts.gate_up_proj_blocks` / `_scales`), dequantized at
load to the 16-bit 3-D tensors transformers computes with: each byte holds two FP4 (e2m1) codes, low
nibble first, and every 32 values share a power-of-two scale (a uint8 exponent biased by 127). The
values are exact in bfloat16 (a 3-bit significand times a power of two), so the model served is the
one transformers dequantizes (`Mxfp4Config(dequantize=True)`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_SUFFIXES = ("_blocks", "_scales")


def is_mxfp4(cfg: dict[str, Any]) -> bool:
    """A config.json of a gpt-oss checkpoint whose experts are stored in MXFP4 (OpenAI's originals)."""
    quant = cfg.get("quantization_config")
    return (cfg.get("model_type") == "gpt_oss" and isinstance(quant, dict)
            and str(quant.get("quant_method", "")).lower() == "mxfp4")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [E, out, G, 16] uint8 and scales [E, out, G] uint8 -> [E, in = G * 32, out] (the layout
    of transformers' GptOssExperts), computed in float32 and rounded once."""
    if blocks.dtype != torch.uint8 or tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} do not match scales "
                         f"{tuple(scales.shape)} (expected [..., G, 16] uint8 and [..., G])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [E, out, G, 16, 2]: low nibble first
    values = lut[codes].flatten(-2)  # [E, out, G, 32]
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.flatten(-2).transpose(1, 2).contiguous().to(dtype)


def mxfp4_dequantized(named: Iterator[tuple[str, torch.Tensor]],
                      dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with every `<name>_blocks` / `<name>_scales` pair replaced by
    `<name>` dequantized (a pair may span shards: the first half waits for the second); a half
    without its pair stops the load."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    count = 0
    for name, value in named:
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            yield name, value
            continue
        base = name[: -len(suffix)]
        halves = pending.setdefault(base, {})
        halves[suffix] = value
        if len(halves) == 2:
            del pending[base]
            count += 1
            yield base, dequantize_mxfp4(halves["_blocks"], halves["_scales"], dtype)
    if pending:
        base, halves = next(iter(pending.items()))
        missing = next(s for s in _SUFFIXES if s not in halves)
        raise ValueError(f"checkpoint has {base}{next(iter(halves))} but no {base}{missing}: an incomplete MXFP4 "
                         f"checkpoint")
    logger.info("%d MXFP4 expert tensors dequantized to %s at load (served as 16-bit experts)", count, dtype)
