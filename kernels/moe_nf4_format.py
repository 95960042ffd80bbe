"""NF4 experts stacked (Unsloth's `-bnb-4bit` MoE layout, one bitsandbytes 4-bit linear per expert):
GroupedNF4 holds each expert's packed bytes and block statistics as one row of a [E, ...] tensor, so
that one kernel launch reads every expert's weight. Ground floor beside sloth_kernels.nf4_format: the
reference (moe_nf4.py) and the grouped Triton GEMMs (triton_moe_nf4.py) both read it, and it imports
neither."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nf4_format import NF4Weight, is_nf4_code


@dataclass(frozen=True, slots=True)
class GroupedNF4:
    """E weights of one shape [out, in] in NF4; expert e is NF4Weight `self.expert(e)` (views)."""

    data: torch.Tensor  # uint8 [E, ceil(out * in / 2)]
    absmax: torch.Tensor  # [E, ceil(out * in / blocksize)]: uint8 when nested, float32 otherwise
    code: torch.Tensor  # float32 [16]
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int
    state2_absmax: torch.Tensor | None  # float32 [E, ceil(num absmax / state2_blocksize)]
    state2_code: torch.Tensor | None  # float32 [256]
    offset: torch.Tensor | None  # float32 [E]: each expert's mean absmax
    state2_blocksize: int

    @property
    def num_experts(self) -> int:
        return self.data.shape[0]

    def expert(self, e: int) -> NF4Weight:
        return NF4Weight(data=self.data[e], absmax=self.absmax[e], code=self.code, shape=self.shape, dtype=self.dtype,
                         blocksize=self.blocksize,
                         state2_absmax=None if self.state2_absmax is None else self.state2_absmax[e],
                         state2_code=self.state2_code, offset=None if self.offset is None else self.offset[e],
                         state2_blocksize=self.state2_blocksize)


def stack_nf4(ws: list[NF4Weight]) -> GroupedNF4 | None:
    """The experts' weights as one GroupedNF4 (their bytes copied once into the stack); None when
    they do not share a shape, NF4's code book, block sizes and dtype (then they run one by one)."""
    first = ws[0]
    same = all(w.shape == first.shape and w.blocksize == first.blocksize and w.dtype == first.dtype
               and w.nested == first.nested and w.state2_blocksize == first.state2_blocksize
               and w.absmax.dtype == first.absmax.dtype and w.device == first.device and not w.group_offsets
               and torch.equal(w.code, first.code) for w in ws)
    if not same or not is_nf4_code(first.code):
        return None
    nested = first.nested
    if nested:
        assert first.state2_code is not None
        if not all(w.state2_code is not None and torch.equal(w.state2_code, first.state2_code) for w in ws):
            return None
    return GroupedNF4(
        data=torch.stack([w.data for w in ws]), absmax=torch.stack([w.absmax for w in ws]), code=first.code,
        shape=first.shape, dtype=first.dtype, blocksize=first.blocksize,
        state2_absmax=torch.stack([w.state2_absmax for w in ws if w.state2_absmax is not None]) if nested else None,
        state2_code=first.state2_code,
        offset=torch.stack([w.offset.reshape(()) for w in ws if w.offset is not None]).float() if nested else None,
        state2_blocksize=first.state2_blocksize,
    )
