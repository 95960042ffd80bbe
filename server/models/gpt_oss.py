"""gpt-oss: Llama-style attention (server/models/llama.py) with q/k/v/o biases, attention sinks and
alternating sliding-window layers, RMSNorms that scale in float32 before rounding, and a mixture of
experts whose router and experts carry biases, with the clamped SwiGLU of gate|up interleaved."""

from __future__ import annotations

import torch
from torch import nn

from sloth_kernels.norm import gemma_add_rms_norm

from .config import ModelConfig
from .gpt_oss_experts import GptOssExperts
from .layers import StepMetadata
from .llama import Attention, LlamaForCausalLM
from .per_adapter import AdapterStep

Rope = tuple[torch.Tensor, torch.Tensor]


class GptOssRMSNorm(nn.Module):
    """transformers' GptOssRMSNorm: normalize and scale in float32, round once (`scale` is the
    float32 weight, cached per weight tensor so that a replaced weight is seen)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self._scale: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight it came from, float32 copy)

    @property
    def scale(self) -> torch.Tensor:
        if self._scale is None or self._scale[0] is not self.weight:
            self._scale = (self.weight, self.weight.float())
        return self._scale[1]


class GptOssRouter(nn.Module):
    def __init__(self, num_experts: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(num_experts), requires_grad=False)


class GptOssMoeBlock(nn.Module):
    """Top-k of the biased router logits, softmax over the chosen k (in the logits' dtype), then the
    weighted sum of those experts' outputs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = GptOssRouter(cfg.num_experts, cfg.hidden_size)
        self.experts = GptOssExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)

    def forward(self, x: torch.Tensor, meta: StepMetadata | None = None) -> torch.Tensor:
        logits = nn.functional.linear(x, self.router.weight, self.router.bias)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=top.dtype)
        return self.experts(x, ids, weights, meta)


class GptOssDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.prefix = f"model.layers.{index}"
        self.self_attn = Attention(cfg, f"{self.prefix}.self_attn", index)
        self.mlp = GptOssMoeBlock(cfg)
        self.input_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def _add_norm(self, name: str, h: torch.Tensor, residual: torch.Tensor | None,
                  adapters: AdapterStep | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = gemma_add_rms_norm(h, residual, getattr(self, name).scale, self.eps)
        if adapters is not None:  # an adapter's own norm weight, for its tokens
            h = adapters.renorm(f"{self.prefix}.{name}", h, residual, self.eps)
        return h, residual

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, meta: StepMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], rope: Rope,
                adapters: AdapterStep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self._add_norm("input_layernorm", h, residual, adapters)
        h = self.self_attn(positions, h, meta, kv_cache, rope, adapters)
        h, residual = self._add_norm("post_attention_layernorm", h, residual, adapters)
        return self.mlp(h, meta), residual


class GptOssForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM's embedding, rotary tables, LoRA and logits with gpt-oss's layers and norms."""

    layer_class = GptOssDecoderLayer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.model.norm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # type: ignore[assignment]

    def post_load(self) -> None:
        """After the weights are in: every norm's float32 scale now, not in the first step, which may
        be a CUDA-graph capture (where a tensor made for the cache would hold nothing outside it)."""
        for m in self.modules():
            if isinstance(m, GptOssRMSNorm):
                m.scale  # noqa: B018 (computes and caches)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None) -> torch.Tensor:
        embed = self.model.embed_tokens
        h = embed(input_ids) if adapters is None else adapters.embed(embed, input_ids)
        residual: torch.Tensor | None = None
        rope = (self.rope_cos, self.rope_sin)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            h, residual = layer(positions, h, residual, meta, kv, rope, adapters)
        norm = self.model.norm
        assert isinstance(norm, GptOssRMSNorm)
        h, residual = gemma_add_rms_norm(h, residual, norm.scale, norm.eps)
        return h if adapters is None else adapters.renorm("model.norm", h, residual, norm.eps)

