"""The LayerNorm families, Cohere (Command-R, Aya) and StableLM, on the Llama attention and MLP:
LayerNorms in their two forms, attention and MLP in parallel on one normed input (Cohere; StableLM
with `use_parallel_residual`) or one after the other, and Cohere's logit scale. Config:
server/models/layernorm_config.py."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import StepMetadata
from .llama import MLP, Attention, LlamaForCausalLM
from .per_adapter import AdapterStep


class LayerNorm(nn.Module):
    """torch's LayerNorm with a bias (StableLM), or Cohere's: in float32, without a bias, the weight
    applied in float32 before the one rounding (`fp32`)."""

    def __init__(self, size: int, eps: float, fp32: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.bias = None if fp32 else nn.Parameter(torch.zeros(size), requires_grad=False)
        self.eps, self.fp32 = eps, fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp32:
            return nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        xf = x.float()
        centred = xf - xf.mean(-1, keepdim=True)
        normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


def layer_norm(cfg: ModelConfig) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_kind == "layernorm_fp32")


class LayerNormDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, f"model.layers.{index}.self_attn", index)
        self.mlp = MLP(cfg)
        self.input_layernorm = layer_norm(cfg)
        self.post_attention_layernorm = None if cfg.parallel_residual else layer_norm(cfg)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        meta: StepMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        x = self.input_layernorm(h)
        attn = self.self_attn(positions, x, meta, kv_cache, rope)
        if self.post_attention_layernorm is None:  # parallel: both read x, added in transformers' order
            return h + attn + self.mlp(x, meta)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h), meta)


class LayerNormForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM's embedding, rotary tables and LoRA with these layers, the final LayerNorm and
    the logit scale. Adapters' own norms are refused for these families (server/loader/adapter_modules.py)."""

    layer_class = LayerNormDecoderLayer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.model.norm = layer_norm(cfg)  # type: ignore[assignment]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: StepMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        adapters: AdapterStep | None = None,
    ) -> torch.Tensor:
        embed = self.model.embed_tokens
        h = embed(input_ids) if adapters is None else adapters.embed(embed, input_ids)
        rope = (self.rope_cos, self.rope_sin)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            h = layer(positions, h, meta, kv, rope)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        """Cohere scales the logits in the weights' dtype before they become float32."""
        scale = self.config.logit_scale
        if scale == 1.0:
            return super().compute_logits(hidden, adapters)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if adapters is not None:
            return adapters.logits(hidden, weight) * scale
        return (nn.functional.linear(hidden, weight) * scale).float()
