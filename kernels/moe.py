"""Mixture-of-experts compute: the routers (softmax, top-k, optional renormalization; or LFM2-MoE's
sigmoid with biased picks, as transformers does them) and the experts' SwiGLU MLPs for a flat batch of tokens. `moe_experts_ref` is the plain
PyTorch reference (tokens grouped by expert, results index-added back, in transformers' order, so on
one device it is bit-exact to transformers), `moe_experts_lora_ref` the same with each token's expert
LoRA (sloth_kernels.moe_lora); `moe_experts` runs the grouped Triton GEMMs of `sloth_kernels.triton_moe`
on CUDA (no host sync, so it is captured in CUDA graphs) and the reference elsewhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .moe_lora import ExpertLoRA, MoELoRA, interpreting, moe_lora_delta_ref

# (expert index, its tokens' hidden states [n, hidden]) -> the expert's output [n, hidden]
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]
# (expert, projection "gate_up" / "down", rows) -> the expert's projection of those rows, without LoRA
Project = Callable[[int, str, torch.Tensor], torch.Tensor]


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, normalize: bool,
          weights_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, top_k] int64, routing weights [T, top_k]). The logits are x's dtype, the
    softmax float32; the weights stay float32 with `weights_fp32` (Mixtral), else are rounded to x's
    dtype (Qwen-MoE)."""
    logits = F.linear(x, gate_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights if weights_fp32 else weights.to(logits.dtype)


def route_sigmoid(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                  normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LFM2-MoE's router: sigmoid scores in x's dtype; the top-k experts by score + bias (float32,
    a load-balancing correction that picks, never weighs); their scores as weights, renormalized to
    sum to 1 (+1e-6) with `normalize`, then times `scale`."""
    scores = F.linear(x, gate_weight).sigmoid()
    ids = torch.topk(scores if bias is None else scores + bias, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    return ids, weights * scale


def swiglu_expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert: down(silu(gate(x)) * up(x)), gate|up stacked as [2 * inter, hidden]."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def moe_experts_ref(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                    expert: ExpertFn) -> torch.Tensor:
    """sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]), each expert run once on all its tokens
    (ordered by top-k position, then token, as transformers orders them) and index-added into a
    zeroed output in expert order. Host-synchronizing (it loops over the experts in use)."""
    out = torch.zeros_like(x)
    for e, slot, token in expert_groups(ids, num_experts):
        y = expert(e, x[token]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def expert_groups(ids: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, top-k position [n], token [n]) for each expert in use, in expert order, its tokens
    ordered by top-k position, then token (transformers' order). Host-synchronizing."""
    num_tokens = ids.shape[0]
    flat = ids.t().reshape(-1)  # assignment a = slot * T + token
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        assignment = order[start : start + n]
        start += n
        yield e, assignment // num_tokens, assignment % num_tokens


def moe_experts_lora_ref(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                         project: Project, activate: Callable[[torch.Tensor], torch.Tensor],
                         lora: MoELoRA) -> torch.Tensor:
    """moe_experts_ref's weighted sum with each expert's projections plus their LoRA delta for
    the tokens whose slot has one (rounded once more, where the projection's output is rounded).
    Host-synchronizing (it loops over the experts in use)."""
    out = torch.zeros_like(x)
    for e, k, token in expert_groups(ids, num_experts):
        rows, row_slots = x[token], lora.slots[token]
        h = activate(_with_delta(project(e, "gate_up", rows), rows, e, row_slots, lora.gate_up))
        y = _with_delta(project(e, "down", h), h, e, row_slots, lora.down)
        out.index_add_(0, token, (y * weights[token, k, None]).to(out.dtype))
    return out


def _with_delta(y: torch.Tensor, rows: torch.Tensor, e: int, row_slots: torch.Tensor,
                lora: ExpertLoRA | None) -> torch.Tensor:
    if lora is None:
        return y
    experts = torch.full_like(row_slots, e)
    return y + moe_lora_delta_ref(rows, experts, row_slots, lora).to(y.dtype)


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, lora: MoELoRA | None = None) -> torch.Tensor:
    """The experts' weighted sum for every token: w_gate_up [E, 2 * inter, hidden] (gate rows first),
    w_down [E, hidden, inter]; with `lora`, each token's expert LoRA added to both projections.
    Triton's grouped GEMMs on CUDA (with LoRA also under TRITON_INTERPRET=1), the reference elsewhere."""
    if x.shape[0] > 0 and (x.is_cuda or (lora is not None and interpreting())):
        from .triton_moe import fused_moe, supports

        if supports(x, w_gate_up, w_down):
            return fused_moe(x, ids, weights, w_gate_up, w_down, lora=lora)
    if lora is not None:
        return moe_experts_lora_ref(x, ids, weights, w_gate_up.shape[0],
                                    lambda e, proj, rows: F.linear(rows, (w_gate_up if proj == "gate_up" else w_down)[e]),
                                    silu_and_mul, lora)
    return moe_experts_ref(x, ids, weights, w_gate_up.shape[0],
                           lambda e, rows: swiglu_expert(rows, w_gate_up[e], w_down[e]))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a gate|up output (gate columns first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
