"""LoRA on the experts of a mixture of experts, as adapters hold it on disk, made into one low-rank
update per experts module and projection: A [E, R, in] and B [E, out, R] (scale folded into B), so
expert e's projection of x gains B[e] A[e] x. Two layouts reach here:

- PEFT's `target_parameters` (how Unsloth trains gpt-oss, and transformers 5's 3-D experts of every
  MoE family): one A [r * E, in] and B [out, r * E] per parameter, expert e's factors being
  A.view(E, r, in)[e] and B.view(out, r, E)[..., e] (PEFT's ParamWrapper). Which parameter a pair is
  (gate_up or down) follows from its shapes, which cannot fit both (that would need hidden = inter =
  2 inter).
- One module per expert (transformers 4's `experts.N.gate_proj` / Mixtral's `experts.N.w1`, Unsloth's
  4-bit gpt-oss `experts.gate_up_projs.N`): a gate and an up LoRA become one gate|up update of rank
  r_gate + r_up (A stacked, B block-diagonal: exactly both).

Served per request by server/models/expert_lora.py, or added into the experts' weights here
(--merge-lora: merge_expert_update)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapter_config import AdapterError

if TYPE_CHECKING:
    from ..models.moe import Experts

# (A [E, R, in], B * scale [E, out, R]) by projection ("gate_up", "down"), float32 on the host
ExpertUpdate = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class ParameterLoRA:
    module: str  # the experts module: model.layers.0.mlp.experts
    a: torch.Tensor  # [r * E, in]
    b: torch.Tensor  # [out, r * E], unscaled
    scales: dict[str, float]  # by the parameter it may be (gate_up_proj, down_proj): PEFT's scale for it


@dataclass(slots=True)
class PendingExpertLoRA:
    """What load_lora read, before the model's experts say how it fits."""

    parameters: list[ParameterLoRA] = field(default_factory=list)
    # (experts module, part: gate / up / down / gate_up, expert) -> (A [r, in], B * scale [out, r])
    per_expert: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.parameters or self.per_expert)

    def modules(self) -> set[str]:
        return {p.module for p in self.parameters} | {m for m, _, _ in self.per_expert}


def projection_shapes(experts: Experts) -> dict[str, tuple[int, int]]:
    """(in, out) of each expert's projections, in the order its gate|up output is laid out."""
    return {"gate_up": (experts.hidden, 2 * experts.inter), "down": (experts.inter, experts.hidden)}


def _rows(experts: Experts, part: str) -> tuple[str, int, int]:
    """(projection, first output row, rows) of a per-expert part in its experts' projection."""
    if part in ("gate", "up"):
        if getattr(experts, "interleaved", False):
            raise ValueError("separate gate and up LoRA on experts whose gate|up columns are interleaved")
        return "gate_up", 0 if part == "gate" else experts.inter, experts.inter
    return part, 0, projection_shapes(experts)[part][1]


def resolve_expert_lora(
    name: str, pending: PendingExpertLoRA, experts: Mapping[str, Experts]
) -> dict[str, ExpertUpdate]:
    """Every expert LoRA as one update per experts module and projection; AdapterError naming the
    module where a tensor does not fit the model."""
    parts: dict[tuple[str, str], list[list[tuple[int, torch.Tensor, torch.Tensor]]]] = {}

    def module_of(module: str) -> Experts:
        found = experts.get(module)
        if found is None:
            raise AdapterError(
                f"adapter {name!r} trains MoE experts at {module}, which this model lacks (or serves "
                f"without expert LoRA); trained for another base?"
            )
        return found

    def contributions(module: str, proj: str) -> list[list[tuple[int, torch.Tensor, torch.Tensor]]]:
        return parts.setdefault((module, proj), [[] for _ in range(module_of(module).num_experts)])

    for p in pending.parameters:
        mod = module_of(p.module)
        n = mod.num_experts
        fits = [
            (proj, param)
            for proj, (dim_in, dim_out) in projection_shapes(mod).items()
            for param in p.scales
            if param == f"{proj}_proj"
            and p.a.shape[1] == dim_in
            and p.b.shape[0] == dim_out
            and p.a.shape[0] % n == 0
        ]
        if not fits:
            raise AdapterError(
                f"adapter {name!r} does not fit this model: its LoRA on {p.module} "
                f"({'/'.join(p.scales)}) is A {list(p.a.shape)}, B {list(p.b.shape)}, but the "
                f"{n} experts' projections (in, out) are {projection_shapes(mod)} (trained for "
                f"another base?)"
            )
        proj, param = fits[0]
        r = p.a.shape[0] // n
        a = p.a.reshape(n, r, p.a.shape[1])
        b = p.b.reshape(p.b.shape[0], r, n).permute(2, 0, 1) * p.scales[param]
        for e, rows in enumerate(contributions(p.module, proj)):
            rows.append((0, a[e], b[e]))
    for (module, part, e), (a, b) in pending.per_expert.items():
        mod = module_of(module)
        if not 0 <= e < mod.num_experts:
            raise AdapterError(f"adapter {name!r} trains expert {e} of {module}, which has {mod.num_experts}")
        try:
            proj, start, n_rows = _rows(mod, part)
        except ValueError as exc:
            raise AdapterError(f"adapter {name!r} has {exc} ({module})") from exc
        dim_in = projection_shapes(mod)[proj][0]
        if (b.shape[0], a.shape[1]) != (n_rows, dim_in):
            raise AdapterError(
                f"adapter {name!r} does not fit this model: expert {e} {part} of {module} is "
                f"{n_rows}x{dim_in}, the adapter's is {b.shape[0]}x{a.shape[1]} (trained for "
                f"another base?)"
            )
        contributions(module, proj)[e].append((start, a, b))
    updates: dict[str, ExpertUpdate] = {}
    for (module, proj), per_expert in parts.items():
        dim_in, dim_out = projection_shapes(experts[module])[proj]
        rank = max(sum(a.shape[0] for _, a, _ in rows) for rows in per_expert)
        a_all = torch.zeros(len(per_expert), rank, dim_in)
        b_all = torch.zeros(len(per_expert), dim_out, rank)
        for e, rows in enumerate(per_expert):
            r0 = 0
            for start, a, b in rows:  # blocks on the diagonal: each part's B A, nothing across them
                r = a.shape[0]
                a_all[e, r0 : r0 + r] = a
                b_all[e, start : start + b.shape[0], r0 : r0 + r] = b
                r0 += r
        updates.setdefault(module, {})[proj] = (a_all, b_all)
    return updates


@torch.no_grad()
def merge_expert_update(experts: Experts, update: ExpertUpdate, dtype: torch.dtype) -> int:
    """W_e += B[e] A[e] for every expert and projection of the update (--merge-lora), in float32,
    rounded once to the weights' dtype. NF4 experts become 16-bit first (their exact dequantized
    values); returns the bytes that costs."""
    added = 0
    if experts.quant:
        added = _dequantize_experts(experts, dtype)
    for proj, (a, b) in update.items():
        param = getattr(experts, f"{proj}_proj")
        delta = b.to(param.device) @ a.to(param.device)  # [E, out, in]
        if experts.transposed:
            delta = delta.transpose(1, 2)
        param.data = (param.data.float() + delta).to(param.dtype)
    return added


def _dequantize_experts(experts: Experts, dtype: torch.dtype) -> int:
    from sloth_kernels.nf4 import dequantize_nf4

    device = next(iter(experts.quant.values())).device
    for pname, shape in experts.param_shapes().items():
        if getattr(experts, pname) is None:
            setattr(experts, pname, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False))
    for (e, part), w in experts.quant.items():
        experts.load(part, e, dequantize_nf4(w).to(device, dtype), dtype, device, f"expert {e} {part}")
    experts.quant = {}
    experts.grouped = None
    return sum(
        p.numel() * p.element_size() for p in (experts.gate_up_proj, experts.down_proj) if p is not None
    )
