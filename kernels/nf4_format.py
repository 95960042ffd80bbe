"""The NF4 (bitsandbytes 4-bit) weight format: NF4Weight, bitsandbytes' Linear4bit layout kept as
it is, and NF4's code book. The ground floor of kernels/: the reference (nf4.py) and the Triton
kernels (triton_nf4*.py) both read it, and it imports neither. bitsandbytes itself is imported only inside `to_bnb`, so
the format works without it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

# bitsandbytes' NF4 code book (`get_4bit_type("nf4")`), float32, index = 4-bit value.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class NF4Weight:
    """A [out, in] weight in bitsandbytes' Linear4bit layout, unchanged: element i of the flattened
    weight is code[nibble i of `data`] (high nibble first), scaled by absmax[i // blocksize]. The code
    book is NF4's, or FP4's for `bnb_4bit_quant_type: fp4` (the reference handles both). With nested
    statistics ("compress_statistics") absmax is itself 8-bit: absmax[j] = state2_code[absmax[j]] *
    state2_absmax[j // state2_blocksize] + offset."""

    data: torch.Tensor  # uint8 [ceil(out * in / 2)]: two 4-bit code indices per byte, high nibble first
    absmax: torch.Tensor  # [ceil(out * in / blocksize)]: uint8 when nested, float32 otherwise
    code: torch.Tensor  # float32 [16]: the NF4 code book
    shape: tuple[int, int]  # (out_features, in_features)
    dtype: torch.dtype  # the compute dtype the weight was quantized from
    blocksize: int = 64
    state2_absmax: torch.Tensor | None = None  # float32 [ceil(len(absmax) / state2_blocksize)]
    state2_code: torch.Tensor | None = None  # float32 [256]: bitsandbytes' dynamic 8-bit map
    # float32 scalar: mean absmax, added back after dequantizing; or one per state2 block (a weight
    # fused from several by concat_nf4, each part keeping its own)
    offset: torch.Tensor | None = None
    state2_blocksize: int = 256

    def __post_init__(self) -> None:
        out_features, in_features = self.shape
        numel = out_features * in_features
        if self.data.dtype != torch.uint8 or self.data.numel() != (numel + 1) // 2:
            raise ValueError(f"NF4 data must be {(numel + 1) // 2} uint8 bytes for shape {self.shape}, "
                             f"got {self.data.numel()} of {self.data.dtype}")
        if self.absmax.numel() != -(-numel // self.blocksize):
            raise ValueError(f"absmax has {self.absmax.numel()} entries; shape {self.shape} with blocksize "
                             f"{self.blocksize} needs {-(-numel // self.blocksize)}")
        if self.nested and (self.state2_code is None or self.offset is None):
            raise ValueError("nested NF4 statistics need state2_absmax, state2_code and offset together")
        if (self.offset is not None and self.state2_absmax is not None  # nested: both set (checked above)
                and self.offset.numel() not in (1, self.state2_absmax.numel())):
            raise ValueError(f"offset has {self.offset.numel()} entries; one, or one per state2 block "
                             f"({self.state2_absmax.numel()}), expected")
        if not self.nested and self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without nested statistics, got {self.absmax.dtype}")

    @property
    def nested(self) -> bool:
        return self.state2_absmax is not None

    @property
    def group_offsets(self) -> bool:
        """Nested statistics with an offset per state2 block (see concat_nf4)."""
        return self.offset is not None and self.offset.numel() > 1

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: the packed codes plus the (possibly 8-bit) block statistics."""
        extra = 0 if self.state2_absmax is None else self.state2_absmax.numel() * 4
        return self.data.numel() + self.absmax.numel() * self.absmax.element_size() + extra

    @classmethod
    def from_bnb(cls, weight_data: torch.Tensor, quant_state: Any) -> NF4Weight:
        """Adopt a bitsandbytes `Params4bit` (its `.data` and `.quant_state`) without copying."""
        quant_type = getattr(quant_state, "quant_type", "nf4")
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bitsandbytes 4-bit quant_type {quant_type!r} is not supported (nf4 and fp4 are)")
        shape = tuple(int(s) for s in quant_state.shape)
        if len(shape) != 2:
            raise ValueError(f"expected a 2-D weight, got quant_state.shape {shape}")
        state2 = quant_state.state2 if getattr(quant_state, "nested", False) else None
        device = weight_data.device
        return cls(
            data=weight_data.reshape(-1).view(torch.uint8),
            absmax=quant_state.absmax.reshape(-1),
            code=quant_state.code.to(device=device, dtype=torch.float32),
            shape=(shape[0], shape[1]),
            dtype=quant_state.dtype,
            blocksize=int(quant_state.blocksize),
            state2_absmax=None if state2 is None else state2.absmax.reshape(-1).float(),
            state2_code=None if state2 is None else state2.code.to(device=device, dtype=torch.float32),
            offset=None if state2 is None else quant_state.offset.to(device=device, dtype=torch.float32),
            state2_blocksize=256 if state2 is None else int(state2.blocksize),
        )

    def to_bnb(self) -> tuple[torch.Tensor, Any]:
        """(packed data [n, 1], bitsandbytes QuantState): what `bnb.matmul_4bit` takes."""
        from bitsandbytes.functional import QuantState

        if self.group_offsets:
            raise ValueError("a weight fused by concat_nf4 (an offset per state2 block) has no bitsandbytes form")
        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.state2_absmax, code=self.state2_code,
                                blocksize=self.state2_blocksize, dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code,
                           blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                           offset=self.offset, state2=state2)
        return self.data.view(-1, 1), state

    def to(self, device: torch.device | str) -> NF4Weight:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, data=self.data.to(device), absmax=self.absmax.to(device), code=self.code.to(device),
                       state2_absmax=move(self.state2_absmax), state2_code=move(self.state2_code),
                       offset=move(self.offset))


def is_nf4_code(code: torch.Tensor) -> bool:
    """Whether a 4-bit code book is NF4's, the one the Triton kernels decode (FP4's is not)."""
    return code.numel() == 16 and torch.equal(code.detach().float().cpu(), torch.tensor(NF4_CODE))
