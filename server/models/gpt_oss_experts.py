"""gpt-oss's experts: gate|up with its columns interleaved (gate, up, gate, up, ...) and a bias,
the clamped SwiGLU (up + 1) * gate * sigmoid(1.702 gate) with gate <= limit and |up| <= limit, and
down with a bias. Loaded from every layout a gpt-oss checkpoint or an Unsloth-loaded model has:
transformers' 3-D tensors of every expert ([E, hidden, 2 inter] / [E, inter, hidden]), Unsloth's
16-bit 2-D views of them, and Unsloth's 4-bit per-expert linears (`gate_up_projs.{e}`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sloth_kernels.moe import moe_experts_lora_ref, moe_experts_ref
from sloth_kernels.moe_lora import interpreting

from .expert_lora import ExpertLoRASlots
from .layers import StepMetadata
from .moe import Experts

if TYPE_CHECKING:
    from sloth_kernels.nf4_format import NF4Weight

ALPHA = 1.702
PARTS = ("gate", "up", "down", "gate_up_bias", "down_bias")


def clamped_swiglu(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    """transformers' GptOssExperts._apply_gate, in the activation dtype."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * ALPHA))


class GptOssExperts(Experts):
    """16-bit: gate_up_proj [E, hidden, 2 inter], down_proj [E, inter, hidden] (transformers' layout,
    so x @ w + b is its very product); 4-bit: one NF4 weight per expert and projection ([2 inter,
    hidden] / [hidden, inter], as bitsandbytes quantized Unsloth's per-expert linears). The biases
    stay 16-bit. On a GPU 16-bit experts run as two grouped Triton GEMMs (sloth_kernels.triton_moe), else
    expert by expert (sloth_kernels.moe.moe_experts_ref: transformers' order)."""

    interleaved = transposed = True

    def __init__(self, num_experts: int, hidden: int, inter: int, limit: float) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: other shapes (its loading and bookkeeping are reused)
        self.num_experts, self.hidden, self.inter, self.limit = num_experts, hidden, inter, limit
        self.gate_up_proj: nn.Parameter | None = nn.Parameter(torch.empty(num_experts, hidden, 2 * inter),
                                                              requires_grad=False)
        self.down_proj: nn.Parameter | None = nn.Parameter(torch.empty(num_experts, inter, hidden),
                                                           requires_grad=False)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * inter), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)
        self.quant: dict[tuple[int, str], NF4Weight] = {}
        self.filled: set[tuple[int, str]] = set()
        self.lora = ExpertLoRASlots(num_experts, {"gate_up": (hidden, 2 * inter), "down": (inter, hidden)})

    def param_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {"gate_up_proj": (self.num_experts, self.hidden, 2 * self.inter),
                "down_proj": (self.num_experts, self.inter, self.hidden)}

    def load(self, part: str, expert: int | None, value: torch.Tensor | NF4Weight, dtype: torch.dtype,
             device: torch.device, name: str) -> None:
        """One checkpoint tensor (`part`: gate_up, down, gate_up_bias or down_bias; `expert` None: a
        tensor of every expert, 3-D as transformers holds it or 2-D as Unsloth's 16-bit model does)."""
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint has {name!r}, but the config has {self.num_experts} experts")
        experts = range(self.num_experts) if expert is None else (expert,)
        filled = [(e, p) for e in experts for p in (("gate", "up") if part == "gate_up" else (part,))]
        if not isinstance(value, torch.Tensor):
            want = (2 * self.inter, self.hidden) if part == "gate_up" else (self.hidden, self.inter)
            if expert is None or part.endswith("bias") or tuple(value.shape) != want:
                raise ValueError(f"{name}: 4-bit weight of shape {tuple(value.shape)}, expected {want} per expert")
            self.quant[(expert, part)] = value if value.device == device else value.to(device)
            self.filled.update(filled)
            return
        if not value.is_floating_point():
            raise ValueError(f"{name} is stored as {value.dtype}: serve the 16-bit or bitsandbytes 4-bit model "
                             f"(MXFP4 experts are dequantized by transformers, not read here)")
        pname = {"gate_up": "gate_up_proj", "down": "down_proj"}.get(part, part.replace("_bias", "_proj_bias"))
        param = self._materialized(pname, dtype, device)
        target = param.data if expert is None else param.data[expert]
        value = self._as_layout(part, expert, value)
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} does not fit {pname} "
                             f"{tuple(target.shape)}")
        target.copy_(value)
        self.filled.update(filled)

    def _as_layout(self, part: str, expert: int | None, value: torch.Tensor) -> torch.Tensor:
        """A weight in our (transformers') layout: a per-expert linear's [out, in] transposed;
        Unsloth's 2-D views ([E * 2 inter, hidden] and [hidden, E * inter]) back to 3-D."""
        if part.endswith("bias"):
            return value
        e, h, i = self.num_experts, self.hidden, self.inter
        if expert is not None and value.dim() == 2:
            return value.t()
        if expert is None and value.dim() == 2 and part == "gate_up" and tuple(value.shape) == (e * 2 * i, h):
            return value.view(e, 2 * i, h).transpose(1, 2)
        if expert is None and value.dim() == 2 and part == "down" and tuple(value.shape) == (h, e * i):
            return value.view(h, e, i).permute(1, 2, 0)
        return value

    def missing(self, prefix: str) -> list[str]:
        return [f"{prefix}.{e}.{p}" for e in range(self.num_experts) for p in PARTS if (e, p) not in self.filled]

    def settle(self, dtype: torch.dtype, device: torch.device) -> None:
        """Every expert in 4-bit drops the 16-bit weights; a mix becomes 16-bit (exact dequantized values)."""
        if not self.quant:
            return
        if len(self.quant) == 2 * self.num_experts:
            self.gate_up_proj = self.down_proj = None
            return
        from sloth_kernels.nf4 import dequantize_nf4

        for (expert, part), w in self.quant.items():
            self.load(part, expert, dequantize_nf4(w).to(device, dtype), dtype, device, f"expert {expert} {part}")
        self.quant = {}

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.project(e, "down", self.activate(self.project(e, "gate_up", x)))

    def project(self, e: int, proj: str, rows: torch.Tensor) -> torch.Tensor:
        """Expert e's biased gate|up (interleaved) or down projection of rows, without LoRA."""
        bias = self.gate_up_proj_bias[e] if proj == "gate_up" else self.down_proj_bias[e]
        weight = self.gate_up_proj if proj == "gate_up" else self.down_proj
        if weight is not None:
            return rows @ weight[e] + bias
        from sloth_kernels.nf4 import nf4_linear

        return nf4_linear(rows, self.quant[(e, proj)]) + bias

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(gate_up, self.limit)

    @property
    def runs_grouped(self) -> bool:
        """Whether the experts (and their LoRA) run as grouped kernels on a GPU: 16-bit ones do."""
        return self.gate_up_proj is not None and self.gate_up_proj_bias.dtype == self.gate_up_proj.dtype

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                meta: StepMetadata | None = None) -> torch.Tensor:
        lora = self.lora.step(meta)  # hot-swapped adapters' LoRA on these experts, if the step has any
        gate_up, down = self.gate_up_proj, self.down_proj
        triton_runs = x.is_cuda or (lora is not None and interpreting())
        if triton_runs and x.shape[0] > 0 and gate_up is not None and down is not None:
            from sloth_kernels.triton_moe import fused_moe_gpt_oss, supports

            if supports(x, gate_up, down) and self.gate_up_proj_bias.dtype == self.down_proj_bias.dtype == x.dtype:
                # Two grouped launches (four more with LoRA), no host sync: captured in CUDA graphs.
                return fused_moe_gpt_oss(x, ids, weights, gate_up, self.gate_up_proj_bias, down,
                                         self.down_proj_bias, self.limit, lora=lora)
        # Expert by expert (host-synchronizing): the CPU reference, and NF4 experts.
        if lora is not None:
            return moe_experts_lora_ref(x, ids, weights, self.num_experts, self.project, self.activate, lora)
        return moe_experts_ref(x, ids, weights, self.num_experts, self._expert)
