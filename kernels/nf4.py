"""NF4 (bitsandbytes 4-bit) weights (the format: sloth_kernels.nf4_format): their plain-PyTorch reference
(quantize, dequantize, linear), joining and splitting them, and `nf4_linear`, which runs the fused
Triton kernels of `sloth_kernels.triton_nf4` on CUDA and the reference elsewhere."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from .nf4_format import NF4_CODE, NF4Weight


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in float32, the last block possibly short."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].view(-1, blocksize) * scales[: full // blocksize, None]).reshape(-1)
    if full < n:
        out[full:] = values[full:] * scales[-1]
    return out


def dequantize_absmax_ref(w: NF4Weight) -> torch.Tensor:
    """float32 per-block scales, as bitsandbytes' `dequantize_blockwise(absmax, state2) + offset`."""
    if not w.nested:
        return w.absmax.float()
    assert w.state2_code is not None and w.state2_absmax is not None and w.offset is not None
    absmax = _blockwise(w.state2_code[w.absmax.long()], w.state2_absmax, w.state2_blocksize)
    if w.group_offsets:
        return absmax + w.offset.repeat_interleave(w.state2_blocksize)[: absmax.numel()]
    return absmax + w.offset


def concat_nf4(ws: list[NF4Weight]) -> NF4Weight | None:
    """The weights one under the other ([sum out, in], like q|k|v or gate|up) as one NF4 weight,
    so one kernel launch computes the fused projection; None when they cannot be joined exactly.

    Nothing is re-quantized: the packed codes and 8-bit absmax are concatenated, and with nested
    statistics each part keeps its own offset as one entry per state2 block. So every part must
    end on a whole state2 block (and a whole absmax block, a whole byte), and share the code
    books, dtypes and block sizes; the result dequantizes to exactly the parts' values."""
    first = ws[0]
    k = first.shape[1]
    same = all(w.shape[1] == k and w.blocksize == first.blocksize and w.dtype == first.dtype
               and w.nested == first.nested and w.state2_blocksize == first.state2_blocksize
               and w.device == first.device and w.absmax.dtype == first.absmax.dtype
               and torch.equal(w.code, first.code) for w in ws)
    if len(ws) < 2 or not same:
        return None
    per_group = first.blocksize * (first.state2_blocksize if first.nested else 1)
    if any((w.shape[0] * k) % per_group or (w.shape[0] * k) % 2 for w in ws):
        return None
    nested: dict[str, Any] = {}
    if first.nested:
        assert first.state2_code is not None
        if not all(w.state2_code is not None and torch.equal(w.state2_code, first.state2_code) for w in ws):
            return None
        offsets = []
        for w in ws:
            assert w.state2_absmax is not None and w.offset is not None
            groups = w.state2_absmax.numel()
            offsets.append(w.offset.reshape(-1).float().expand(groups) if w.offset.numel() == 1 else w.offset)
        nested = dict(state2_absmax=torch.cat([w.state2_absmax for w in ws if w.state2_absmax is not None]),
                      state2_code=first.state2_code,
                      offset=torch.cat(offsets).contiguous())
    return NF4Weight(data=torch.cat([w.data for w in ws]), absmax=torch.cat([w.absmax for w in ws]),
                     code=first.code, shape=(sum(w.shape[0] for w in ws), k), dtype=first.dtype,
                     blocksize=first.blocksize, state2_blocksize=first.state2_blocksize, **nested)


def split_nf4(w: NF4Weight, rows: list[int]) -> list[NF4Weight]:
    """Views of consecutive row ranges of w (the parts concat_nf4 joined): no bytes are copied."""
    k = w.shape[1]
    per_group = w.blocksize * w.state2_blocksize
    parts, start = [], 0
    for n in rows:
        lo, hi = start * k, (start + n) * k  # element range
        nested: dict[str, Any] = {}
        if w.nested:
            assert w.state2_absmax is not None and w.offset is not None
            g = slice(lo // per_group, hi // per_group)
            nested = dict(state2_absmax=w.state2_absmax[g], state2_code=w.state2_code,
                          offset=w.offset[g] if w.group_offsets else w.offset)
        parts.append(replace(w, data=w.data[lo // 2 : hi // 2], absmax=w.absmax[lo // w.blocksize : hi // w.blocksize],
                             shape=(n, k), **nested))
        start += n
    if start != w.shape[0]:
        raise ValueError(f"rows {rows} do not add up to the weight's {w.shape[0]}")
    return parts


def dequantize_nf4_ref(w: NF4Weight) -> torch.Tensor:
    """The [out, in] weight in w.dtype, bit-exact with bitsandbytes.functional.dequantize_4bit."""
    numel = w.shape[0] * w.shape[1]
    idx = torch.stack(((w.data >> 4), (w.data & 0xF)), dim=1).reshape(-1)[:numel]
    values = _blockwise(w.code[idx.long()], dequantize_absmax_ref(w), w.blocksize)
    return values.to(w.dtype).view(w.shape)


def _quantize_blockwise_8bit(a: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU `quantize_blockwise` (0.50): a * (1 / absmax) is binned into 65536 steps over
    [-1, 1], and each step maps to the first code whose midpoint with the next is not below it."""
    n = a.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=a.device)
    padded[:n] = a
    absmax = padded.view(blocks, blocksize).abs().amax(dim=1)
    inv = torch.where(absmax == 0, 0.0, 1.0 / absmax)  # an all-zero block stores code 0
    normed = (padded.view(blocks, blocksize) * inv[:, None]).reshape(-1)[:n].clamp(-1.0, 1.0)
    step = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)  # separate roundings, as the C code
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=a.device)) / 65535.0
    midpoints = 0.5 * (code[:-1] + code[1:])
    lut = torch.searchsorted(midpoints, grid, side="left")
    q = torch.where((absmax == 0).repeat_interleave(blocksize)[:n], 0, lut[step])
    return q.to(torch.uint8), absmax


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map()` (signed, 7 exponent bits): the nested absmax code."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + ((-(10 ** (-6 + i))) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def quantize_nf4_ref(w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True) -> NF4Weight:
    """Quantize a [out, in] weight to NF4 with the same bytes as bitsandbytes' `quantize_4bit` on CPU."""
    if w.dim() != 2 or w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"expected a 2-D float16/bfloat16/float32 weight, got {w.dtype} of shape {tuple(w.shape)}")
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    flat = w.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=w.device)
    padded[:n] = flat
    absmax = padded.view(blocks, blocksize).abs().amax(dim=1)
    scaled = torch.clamp(padded.view(blocks, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    scaled = scaled.reshape(-1)[: n + n % 2]  # an odd count is padded with one 0 nibble, as bnb does
    if n % 2:
        scaled[n] = 0.0
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    data = (q[::2] << 4) | q[1::2]
    if not compress_statistics:
        return NF4Weight(data=data, absmax=absmax, code=code, shape=(w.shape[0], w.shape[1]), dtype=w.dtype,
                         blocksize=blocksize)
    offset = absmax.mean()
    dynamic = _dynamic_map().to(w.device)
    qabsmax, absmax2 = _quantize_blockwise_8bit(absmax - offset, dynamic, 256)
    return NF4Weight(data=data, absmax=qabsmax, code=code, shape=(w.shape[0], w.shape[1]), dtype=w.dtype,
                     blocksize=blocksize, state2_absmax=absmax2, state2_code=dynamic, offset=offset)


def nf4_linear_ref(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) with W dequantized first, as bitsandbytes' `matmul_4bit` does off the GEMV path."""
    return F.linear(x, dequantize_nf4_ref(w).to(x.dtype), None if bias is None else bias.to(x.dtype))


def dequantize_nf4(w: NF4Weight) -> torch.Tensor:
    """The dense weight (for merging adapters at load); the reference runs on any device."""
    return dequantize_nf4_ref(w)


def _cuda_gemv(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor | None:
    """The CUDA GEMV's result (sloth_kernels.cuda_nf4), or None where it is not preferred or cannot compile (then it stays off for the process and the Triton kernels run)."""
    from . import cuda_nf4

    x2 = x.reshape(-1, w.shape[1])
    if not cuda_nf4.prefers(x2, w):
        return None
    try:
        y2 = cuda_nf4.nf4_gemv(x2, w, bias, out)
    except (RuntimeError, OSError, AttributeError) as exc:  # NVRTC/driver missing or failing
        cuda_nf4.disable(f"{type(exc).__name__}: {exc}")
        return None
    return y2 if out is not None else y2.view(*x.shape[:-1], w.shape[0])


def nf4_linear(
    x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x[..., in] @ W.T (+ bias) -> [..., out] in x.dtype. On CUDA the Triton kernels dequantize in
    registers (never writing a dense weight), or, for the few rows where it is faster, the CUDA
    kernel of sloth_kernels.cuda_nf4; elsewhere the reference runs. `out`, if given, is a 2-D
    [tokens, out_features] view (a column slice of a wider tensor is fine) that receives the result."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} input features but the NF4 weight is {w.shape}")
    if x.is_cuda:
        from .triton_nf4 import nf4_matmul, supports

        y_cuda = _cuda_gemv(x, w, bias, out)
        if y_cuda is not None:
            return y_cuda
        if supports(x, w):
            y2 = nf4_matmul(x.reshape(-1, w.shape[1]), w, bias, out)
            return y2 if out is not None else y2.view(*x.shape[:-1], w.shape[0])
    y = nf4_linear_ref(x, w, bias)
    if out is None:
        return y
    out.copy_(y.reshape(-1, w.shape[0]))
    return out


def nf4_linear_stacked(x: torch.Tensor, ws: list[NF4Weight]) -> torch.Tensor:
    """x [T, in] @ [W0; W1; ...].T -> [T, sum out]: the projections that share an input (q|k|v,
    gate|up), each quantized on its own, as one output."""
    if any(w.shape[1] != x.shape[-1] for w in ws):
        raise ValueError(f"x has {x.shape[-1]} input features but the NF4 weights are {[tuple(w.shape) for w in ws]}")
    if x.is_cuda:
        from . import cuda_nf4
        from .triton_nf4 import nf4_matmul_stacked, supports

        x2 = x.reshape(-1, x.shape[-1])
        if not all(cuda_nf4.prefers(x2, w) for w in ws) and all(supports(x, w) for w in ws):
            return nf4_matmul_stacked(x.reshape(-1, x.shape[-1]), ws)
    y = x.new_empty(x.reshape(-1, x.shape[-1]).shape[0], sum(w.shape[0] for w in ws))
    offset = 0
    for w in ws:
        nf4_linear(x, w, out=y[:, offset : offset + w.shape[0]])
        offset += w.shape[0]
    return y
