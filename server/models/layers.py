"""Building blocks shared by the model families: a linear layer with multi-LoRA slots, and the
per-step metadata that attention and LoRA read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from sloth_kernels.attention import AttnMetadata
from sloth_kernels.lora import add_lora
from sloth_kernels.state_batch import StateBatch
from sloth_kernels.triton_nf4_config import GEMV_MAX_ROWS

if TYPE_CHECKING:
    from sloth_kernels.nf4_format import NF4Weight

    from .vision_step import VisionStep


@dataclass(slots=True)
class StepMetadata:
    """Everything a forward pass needs besides token ids and positions (nano-vllm's "context")."""

    attn: AttnMetadata
    lora_slots: torch.Tensor | None = None  # [T] int32 adapter slot per token, -1 for none
    active_lora_slots: list[int] | None = None  # the distinct slots used this step (host)
    vision: VisionStep | None = None  # image-text models: image embeddings to splice, M-RoPE positions
    state: StateBatch | None = None  # models with recurrent layers: each sequence's state slot


class StatefulModel(Protocol):
    """A model with recurrent layers (config.has_state): it holds one state row per slot of the
    engine's state cache (server/engine/state_cache.py) in tensors the runner has it allocate."""

    def state_bytes_per_slot(self, dtype: torch.dtype) -> int: ...

    def allocate_state(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> None: ...


def use_fused_lora(model: nn.Module, on: bool) -> None:
    """Whether the model's 4-bit layers compute their LoRA inside the NF4 product (--fused-lora)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.fused_lora = on


def fuse_quantized_projections(model: nn.Module) -> int:
    """LoRALinear.fuse_quantized on every layer of the model; how many were joined."""
    return sum(m.fuse_quantized() for m in model.modules() if isinstance(m, LoRALinear))


class LoRALinear(nn.Module):
    """y = x W^T (+ bias), then each output slice adds the LoRA of the slot its token selects.
    Fused projections (q|k|v, gate|up) have one slice per original projection.

    The base weight is either dense (`weight`) or, for a 4-bit checkpoint, one NF4 weight per slice
    (`quant`) or one for the whole projection (`fused_quant`), kept in bitsandbytes' packed layout and
    multiplied without a dense copy. A dynamic
    4-bit checkpoint may leave some slices in 16-bit (`llm_int8_skip_modules`): such a mixed layer
    becomes dense at load (see `settle`)."""

    def __init__(self, in_features: int, out_slices: list[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_slices = out_slices
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(sum(out_slices), in_features), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(sum(out_slices)), requires_grad=False) if bias else None
        self.quant: list[NF4Weight | None] | None = None
        self.fused_quant: NF4Weight | None = None  # every slice's NF4 weight as one (fuse_quantized)
        self.four_bit_parts: list[bool] | None = None  # a mixed layer (see settle): its slices in 4-bit on disk
        # Adapter slots: every slice's A stacked along the rank, every slice's B along the output (one
        # shrink and one expand for the whole fused projection), and per-slice views into them.
        self.lora_a_stacked: torch.Tensor | None = None  # [num_slots, len(out_slices) * rank, in_features]
        self.lora_b_stacked: torch.Tensor | None = None  # [num_slots, sum(out_slices), rank], scale folded in
        self.lora_a: list[torch.Tensor] = []  # per slice [num_slots, rank, in_features]
        self.lora_b: list[torch.Tensor] = []  # per slice [num_slots, out_slice, rank]
        self.lora_ranks: torch.Tensor | None = None  # [num_slots] int32: each slot's adapter rank (shared)
        # 4-bit, no bias: the LoRA inside the NF4 product (sloth_kernels.nf4_lora) where its kernel applies
        self.fused_lora = False

    def set_quantized(self, index: int, w: NF4Weight) -> None:
        """Adopt an NF4 weight for slice `index`; once every slice has one, the dense weight goes."""
        want = (self.out_slices[index], self.in_features)
        if tuple(w.shape) != want:
            raise ValueError(f"4-bit weight of shape {tuple(w.shape)} does not fit slice {index} of shape {want}")
        if self.quant is None:
            self.quant = [None] * len(self.out_slices)
        self.quant[index] = w
        self.fused_quant = None
        if all(q is not None for q in self.quant):
            self.weight = None

    def set_fused_quantized(self, w: NF4Weight) -> None:
        """Adopt one NF4 weight covering every slice (a checkpoint that stores q|k|v or gate|up as one
        projection, as Phi-3 does: bitsandbytes quantized it whole). It runs as one kernel launch;
        `quant` holds per-slice views where the slices start on whole absmax (and state2) blocks,
        else None: nothing needs them, the fused weight is complete."""
        from sloth_kernels.nf4 import split_nf4

        want = (sum(self.out_slices), self.in_features)
        if tuple(w.shape) != want:
            raise ValueError(f"4-bit weight of shape {tuple(w.shape)} does not fit the fused projection {want}")
        per_block = w.blocksize * (w.state2_blocksize if w.nested else 1)
        whole_blocks = all(n * self.in_features % per_block == 0 and n * self.in_features % 2 == 0
                           for n in self.out_slices)
        self.quant = list(split_nf4(w, self.out_slices)) if whole_blocks else None
        self.fused_quant = w
        self.weight = None

    def settle(self) -> bool:
        """After loading: a layer whose slices came partly in 4-bit and partly in 16-bit becomes one
        16-bit weight, its 4-bit slices dequantized to exactly bitsandbytes' values (until then
        their rows of the dense weight were never written). True when the layer was mixed.

        Measured on the H200 (bench/results/quant-layouts-h200.md, Llama-3-8B shapes): the dense
        layer was as fast or faster than computing part by part at 1 to 512 rows (q|k|v with q in
        16-bit: 0.014 against 0.020 ms at 1 row), the 16-bit part dominating what either reads."""
        if self.quant is None or all(q is not None for q in self.quant):
            return False
        from sloth_kernels.nf4 import dequantize_nf4

        assert self.weight is not None and not self.weight.is_meta
        self.four_bit_parts = [q is not None for q in self.quant]
        start = 0
        for q, n in zip(self.quant, self.out_slices, strict=True):
            if q is not None:
                self.weight.data[start : start + n] = dequantize_nf4(q).to(self.weight.device, self.weight.dtype)
            start += n
        self.quant = None
        return True

    def fuse_quantized(self) -> bool:
        """Join the slices' NF4 weights into one (sloth_kernels.nf4.concat_nf4: exact, nothing
        re-quantized), so q|k|v or gate|up is one kernel launch; the slices become views into it.
        False where there is nothing to join, it is joined already, or the parts do not join exactly."""
        from sloth_kernels.nf4 import concat_nf4, split_nf4

        if self.fused_quant is not None:
            return False
        if self.quant is None or len(self.quant) < 2 or any(q is None for q in self.quant):
            return False
        fused = concat_nf4([q for q in self.quant if q is not None])
        if fused is None:
            return False
        self.fused_quant = fused
        self.quant = list(split_nf4(fused, self.out_slices))
        return True

    @property
    def is_quantized(self) -> bool:
        return self.weight is None

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight.data
        from sloth_kernels.nf4 import dequantize_nf4

        if self.fused_quant is not None:
            return dequantize_nf4(self.fused_quant)
        assert self.quant is not None
        return torch.cat([dequantize_nf4(q) for q in self.quant if q is not None], dim=0)

    def set_dense(self, weight: torch.Tensor) -> None:
        """Replace the base weight by a dense one (used when merging an adapter at load)."""
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.quant = None
        self.fused_quant = None

    def create_lora_slots(self, num_slots: int, rank: int, dtype: torch.dtype, device: torch.device,
                          ranks: torch.Tensor | None = None) -> None:
        """Zeroed slots of `rank`; `ranks` (the manager's, one per slot) tells the kernels how much
        of each slot its adapter fills."""
        self.lora_ranks = ranks
        slices = len(self.out_slices)
        a = torch.zeros(num_slots, slices * rank, self.in_features, dtype=dtype, device=device)
        b = torch.zeros(num_slots, sum(self.out_slices), rank, dtype=dtype, device=device)
        self.lora_a_stacked, self.lora_b_stacked = a, b
        self.lora_a = [a[:, i * rank : (i + 1) * rank] for i in range(slices)]
        offsets = [sum(self.out_slices[:i]) for i in range(slices)]
        self.lora_b = [b[:, o : o + n] for o, n in zip(offsets, self.out_slices, strict=True)]

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return nn.functional.linear(x, self.weight, self.bias)
        from sloth_kernels.nf4 import nf4_linear, nf4_linear_stacked

        if self.fused_quant is not None:
            y = nf4_linear(x, self.fused_quant)
        else:  # several slices: one output, no concatenation copy (and one matmul for long prompts)
            assert self.quant is not None
            quant = [q for q in self.quant if q is not None]
            y = nf4_linear(x, quant[0]) if len(quant) == 1 else nf4_linear_stacked(x, quant)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor, meta: StepMetadata | None = None) -> torch.Tensor:
        has_lora = self.lora_a_stacked is not None and meta is not None and meta.lora_slots is not None
        if (has_lora and self.fused_lora and self.weight is None and self.bias is None
                and x.numel() <= GEMV_MAX_ROWS * self.in_features):  # decode-sized: the fused kernel's rows
            assert meta is not None
            return self.fused_forward(x, meta)
        y = self.base_forward(x)
        if has_lora:
            assert self.lora_b_stacked is not None and meta is not None and meta.lora_slots is not None
            assert self.lora_a_stacked is not None
            add_lora(y, x, self.lora_a_stacked, self.lora_b_stacked, meta.lora_slots, meta.active_lora_slots,
                     self.out_slices, self.lora_ranks)
        return y

    def fused_forward(self, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """The 4-bit product with the LoRA of each token's slot, through sloth_kernels.nf4_lora: one
        launch for a fused projection, one per slice otherwise (each slice's A and B are views)."""
        from sloth_kernels.nf4_lora import nf4_linear_lora

        a, b, slots = self.lora_a_stacked, self.lora_b_stacked, meta.lora_slots
        assert a is not None and b is not None and slots is not None
        x2 = x.reshape(-1, self.in_features)
        if self.fused_quant is not None:
            y = nf4_linear_lora(x2, self.fused_quant, a, b, slots, self.out_slices, self.lora_ranks,
                                meta.active_lora_slots)
            return y.view(*x.shape[:-1], y.shape[-1])
        assert self.quant is not None
        y = x2.new_empty(x2.shape[0], sum(self.out_slices))
        offset = 0
        for q, a_i, b_i, n in zip(self.quant, self.lora_a, self.lora_b, self.out_slices, strict=True):
            assert q is not None  # every slice in 4-bit: the dense weight is gone
            nf4_linear_lora(x2, q, a_i, b_i, slots, [n], self.lora_ranks, meta.active_lora_slots,
                            out=y[:, offset : offset + n])
            offset += n
        return y.view(*x.shape[:-1], y.shape[-1])
