"""The sparse MLP of the mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral): a router, the
experts (16-bit as fused 3-D weights, or 4-bit per expert as a bitsandbytes checkpoint keeps them)
and Qwen2-MoE's shared expert behind its sigmoid gate; and the checkpoint names of the experts."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from sloth_kernels.moe import moe_experts, moe_experts_lora_ref, moe_experts_ref, route

from .config import ModelConfig
from .expert_lora import ExpertLoRASlots
from .layers import LoRALinear, StepMetadata

if TYPE_CHECKING:
    from sloth_kernels.moe_nf4_format import GroupedNF4
    from sloth_kernels.nf4_format import NF4Weight

logger = logging.getLogger(__name__)

PARTS = ("gate", "up", "down")
# Per-expert checkpoint names (what save_pretrained writes; Mixtral's w1 / w3 / w2 are gate / up / down)
# and the fused 3-D parameters transformers 5 holds in memory (what an Unsloth-loaded model yields).
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
# gpt-oss: expert biases (3-D layout), Unsloth's 16-bit 2-D views (`.weight`) and its 4-bit per-expert
# linears (`gate_up_projs.{e}.weight` / `.bias`).
_GPT_OSS_FUSED = re.compile(r"^(.*\.experts)\.(gate_up|down)_proj(_bias|\.weight)$")
_GPT_OSS_PER_EXPERT = re.compile(r"^(.*\.experts)\.(gate_up|down)_projs\.(\d+)\.(weight|bias)$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


# GraniteMoe's own checkpoint names (transformers 5 renames them at load): experts as input / output
# linears of 3-D weights, the router in a `layer` submodule.
_GRANITE_MOE = ((".mlp.input_linear.weight", ".mlp.experts.gate_up_proj"),
                (".mlp.output_linear.weight", ".mlp.experts.down_proj"), (".mlp.router.layer.", ".mlp.router."))


def moe_checkpoint_name(name: str) -> str:
    """Mixtral's (and Granite's) checkpoints call the sparse MLP `block_sparse_moe`; transformers and we
    call it `mlp`. Unsloth's gpt-oss keeps the router's weight and bias in a `router.linear` submodule."""
    name = name.replace(".block_sparse_moe.", ".mlp.").replace(".mlp.router.linear.", ".mlp.router.")
    for old, new in _GRANITE_MOE:
        name = name.replace(old, new)
    return name


def expert_target(name: str) -> tuple[str, str, int | None] | None:
    """(experts module, part "gate" / "up" / "down" / "gate_up", expert index or None for a fused
    3-D tensor of every expert) for an expert weight's name; None for anything else."""
    name = moe_checkpoint_name(name)
    m = _PER_EXPERT.match(name)
    if m:
        return m.group(1), _PART[m.group(3)], int(m.group(2))
    m = _FUSED.match(name)
    if m:
        return m.group(1), "gate_up" if m.group(2) == "gate_up_proj" else "down", None
    m = _GPT_OSS_FUSED.match(name)
    if m:
        return m.group(1), m.group(2) + ("_bias" if m.group(3) == "_bias" else ""), None
    m = _GPT_OSS_PER_EXPERT.match(name)
    if m:
        return m.group(1), m.group(2) + ("_bias" if m.group(4) == "bias" else ""), int(m.group(3))
    return None


def expert_weight_names(name: str, num_experts: int) -> set[str]:
    """The per-expert names a checkpoint tensor stands for (a fused tensor: every expert's), so that
    names on disk and names read compare whichever layout each side used; other names unchanged."""
    if _GPT_OSS_PER_EXPERT.match(name) or ".mlp.router.linear." in name:
        # Unsloth's 4-bit gpt-oss layout: read only by a model of that layout (transformers' own class
        # leaves these unread and its 3-D experts random), so the name must match as it is.
        return {name}
    target = expert_target(name)
    if target is None:
        return {moe_checkpoint_name(name)}
    module, part, expert = target
    parts = ("gate", "up") if part == "gate_up" else (part,)
    experts = range(num_experts) if expert is None else (expert,)
    return {f"{module}.{e}.{p}" for e in experts for p in parts}


class Experts(nn.Module):
    """Every expert's SwiGLU MLP: gate|up as [E, 2 * inter, hidden] (gate rows first), down as
    [E, hidden, inter], or, from a 4-bit checkpoint, one NF4 weight per expert and part."""

    # The NF4 gate, up and down weights stacked for the grouped kernels (set by settle; a class
    # attribute, so subclasses with their own layout have it as None).
    grouped: tuple[GroupedNF4, GroupedNF4, GroupedNF4] | None = None
    interleaved = False  # gate|up outputs alternate (gpt-oss) rather than gate's first
    transposed = False  # weights stored [E, in, out] (gpt-oss) rather than [E, out, in]

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.gate_up_proj: nn.Parameter | None = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden),
                                                              requires_grad=False)
        self.down_proj: nn.Parameter | None = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)
        self.quant: dict[tuple[int, str], NF4Weight] = {}
        self.filled: set[tuple[int, str]] = set()
        # hot-swapped adapters' updates (server/models/expert_lora.py)
        self.lora = ExpertLoRASlots(num_experts, {"gate_up": (hidden, 2 * inter), "down": (inter, hidden)})

    def param_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {"gate_up_proj": (self.num_experts, 2 * self.inter, self.hidden),
                "down_proj": (self.num_experts, self.hidden, self.inter)}

    def load(self, part: str, expert: int | None, value: torch.Tensor | NF4Weight, dtype: torch.dtype,
             device: torch.device, name: str) -> None:
        """One checkpoint tensor: a fused 3-D tensor of every expert, or one expert's projection
        (16-bit, copied into the 3-D weights; or NF4, kept packed until `settle`)."""
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint has {name!r}, but the config has {self.num_experts} experts")
        if not isinstance(value, torch.Tensor):
            want = (self.hidden, self.inter) if part == "down" else (self.inter, self.hidden)
            if expert is None or tuple(value.shape) != want:
                raise ValueError(f"{name}: 4-bit weight of shape {tuple(value.shape)}, expected {want} per expert")
            self.quant[(expert, part)] = value if value.device == device else value.to(device)
            self.filled.add((expert, part))
            return
        if not value.is_floating_point():
            raise ValueError(f"{name} is stored as {value.dtype}: serve the 16-bit or bitsandbytes 4-bit model")
        param = self._materialized("down_proj" if part == "down" else "gate_up_proj", dtype, device)
        rows = {"gate": slice(0, self.inter), "up": slice(self.inter, 2 * self.inter)}.get(part, slice(None))
        target = param.data if expert is None else param.data[expert]
        target = target if part in ("down", "gate_up") else target[..., rows, :]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(target.shape)}")
        target.copy_(value)
        parts = ("gate", "up") if part == "gate_up" else (part,)
        experts = range(self.num_experts) if expert is None else (expert,)
        self.filled.update((e, p) for e in experts for p in parts)

    def _materialized(self, pname: str, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        param = getattr(self, pname)
        if param.is_meta:
            param = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
            setattr(self, pname, param)
        return param

    def missing(self, prefix: str) -> list[str]:
        return [f"{prefix}.{e}.{p}" for e in range(self.num_experts) for p in PARTS if (e, p) not in self.filled]

    def settle(self, dtype: torch.dtype, device: torch.device) -> None:
        """After loading: every expert in 4-bit drops the 3-D weights; a mix of 4-bit and 16-bit
        experts becomes 16-bit, the 4-bit ones dequantized to exactly bitsandbytes' values."""
        if not self.quant:
            return
        if len(self.quant) == 3 * self.num_experts:
            self.gate_up_proj = self.down_proj = None
            self._stack()
            return
        from sloth_kernels.nf4 import dequantize_nf4

        for (expert, part), w in self.quant.items():
            dense = dequantize_nf4(w).to(device, dtype)
            self.load(part, expert, dense, dtype, device, f"expert {expert} {part}")
        self.quant = {}

    def _stack(self) -> None:
        """Every expert's gate, up and down weights stacked (GroupedNF4) for the grouped kernels; the
        per-expert weights become views of the stacks, so the bytes are held once."""
        from sloth_kernels.moe_nf4_format import stack_nf4

        gate, up, down = (stack_nf4([self.quant[(e, p)] for e in range(self.num_experts)]) for p in PARTS)
        if gate is None or up is None or down is None:
            return  # experts quantized differently from one another: run one by one
        self.grouped = (gate, up, down)
        self.quant = {(e, p): s.expert(e) for p, s in zip(PARTS, self.grouped, strict=True)
                      for e in range(self.num_experts)}

    @property
    def is_quantized(self) -> bool:
        return self.gate_up_proj is None

    def _nf4_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        from sloth_kernels.nf4 import nf4_linear

        gate, up = nf4_linear(x, self.quant[(e, "gate")]), nf4_linear(x, self.quant[(e, "up")])
        return nf4_linear(nn.functional.silu(gate) * up, self.quant[(e, "down")])

    def project(self, e: int, proj: str, rows: torch.Tensor) -> torch.Tensor:
        """Expert e's gate|up ([n, 2 inter], gate first) or down projection of rows, without LoRA."""
        if self.gate_up_proj is not None and self.down_proj is not None:
            return nn.functional.linear(rows, self.gate_up_proj[e] if proj == "gate_up" else self.down_proj[e])
        from sloth_kernels.nf4 import nf4_linear

        if proj == "down":
            return nf4_linear(rows, self.quant[(e, "down")])
        return torch.cat([nf4_linear(rows, self.quant[(e, "gate")]), nf4_linear(rows, self.quant[(e, "up")])], -1)

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up

    @property
    def runs_grouped(self) -> bool:
        """Whether the experts (and their LoRA) run as grouped kernels on a GPU: no host sync."""
        return self.grouped is not None or self.gate_up_proj is not None

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                meta: StepMetadata | None = None) -> torch.Tensor:
        lora = self.lora.step(meta)  # hot-swapped adapters' LoRA on these experts, if the step has any
        if self.grouped is not None:
            from sloth_kernels.moe_nf4 import moe_experts_nf4

            return moe_experts_nf4(x, ids, weights, *self.grouped, lora=lora)
        if self.gate_up_proj is None or self.down_proj is None:
            # Experts quantized differently from one another: one by one (host-synchronizing).
            if lora is not None:
                return moe_experts_lora_ref(x, ids, weights, self.num_experts, self.project, self.activate, lora)
            return moe_experts_ref(x, ids, weights, self.num_experts, self._nf4_expert)
        return moe_experts(x, ids, weights, self.gate_up_proj, self.down_proj, lora=lora)


class Router(nn.Module):
    def __init__(self, num_experts: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)


class SharedExpert(nn.Module):
    """Qwen2-MoE's expert that every token goes through (a dense SwiGLU MLP; LoRA-capable)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.inter = inter
        self.gate_up_proj = LoRALinear(hidden, [inter] * 2)
        self.down_proj = LoRALinear(inter, [hidden])

    def forward(self, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, meta).split(self.inter, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up, meta)


class SparseMoeBlock(nn.Module):
    """Route each token to its top-k experts and sum their outputs by routing weight (plus, for
    Qwen2-MoE, sigmoid(shared_expert_gate(x)) * shared_expert(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.normalize, self.weights_fp32 = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.router_weights_fp32
        self.gate = Router(cfg.num_experts, cfg.hidden_size)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert: SharedExpert | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
            self.shared_expert_gate.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        ids, weights = route(x, self.gate.weight, self.top_k, self.normalize, self.weights_fp32)
        out = self.experts(x, ids, weights, meta)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            shared = self.shared_expert(x, meta)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out


def load_expert_weight(model: nn.Module, name: str, value: torch.Tensor | NF4Weight, dtype: torch.dtype,
                       device: torch.device) -> bool:
    """Load `name` into its Experts module if it is an expert weight (True); False otherwise."""
    target = expert_target(name)
    if target is None:
        return False
    module_name, part, expert = target
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if not isinstance(module, Experts):
        raise ValueError(f"checkpoint has {name!r}, which this model has no experts for (a dense layer? "
                         f"check mlp_only_layers and decoder_sparse_step in config.json)")
    module.load(part, expert, value, dtype, device, name)
    return True


def expert_modules(model: nn.Module) -> dict[str, Experts]:
    """The model's experts modules by name (the names adapters use for them)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts)}


def settle_experts(model: nn.Module, dtype: torch.dtype, device: torch.device) -> list[str]:
    """After loading: the expert weights the checkpoint did not hold (by per-expert name); every
    Experts module settled (see Experts.settle)."""
    missing: list[str] = []
    one_by_one = 0
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            missing += module.missing(name)
            module.settle(dtype, device)
            one_by_one += module.is_quantized and module.grouped is None
    if one_by_one and not missing:
        # Experts run one by one read the routing on the host: no CUDA graphs.
        object.__setattr__(model, "supports_cuda_graphs", False)  # a plain attribute, read by LLMEngine
        logger.warning("%d MoE layers run their 4-bit experts one by one (no grouped NF4 kernel for their layout "
                       "or quantization): correct, not fast, and decode runs without CUDA graphs", one_by_one)
    return missing
