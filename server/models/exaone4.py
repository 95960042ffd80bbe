"""EXAONE 4.0 (`Exaone4ForCausalLM`): the Llama attention (q/k RMSNorm per head, per-layer sliding
windows, RoPE on some layers only) and MLP, with an RMSNorm after attention and after the MLP, before
each residual add, and none before them (config: server/models/exaone4_config.py)."""

from __future__ import annotations

import torch

from sloth_kernels.norm import rms_norm

from .config import ModelConfig
from .layers import StepMetadata
from .llama import MLP, Attention, LlamaForCausalLM, RMSNorm
from .per_adapter import AdapterStep


class Exaone4DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.prefix = f"model.layers.{index}"
        self.self_attn = Attention(cfg, f"{self.prefix}.self_attn", index)
        self.mlp = MLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def _norm(self, name: str, h: torch.Tensor, adapters: AdapterStep | None) -> torch.Tensor:
        normed = rms_norm(h, getattr(self, name).weight, self.eps)
        return normed if adapters is None else adapters.renorm(f"{self.prefix}.{name}", normed, h, self.eps)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        meta: StepMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        adapters: AdapterStep | None = None,
    ) -> torch.Tensor:
        h = h + self._norm(
            "post_attention_layernorm", self.self_attn(positions, h, meta, kv_cache, rope, adapters), adapters
        )
        return h + self._norm("post_feedforward_layernorm", self.mlp(h, meta), adapters)


class Exaone4ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM's embedding, rotary tables, LoRA and logits with these layers."""

    layer_class = Exaone4DecoderLayer

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
            h = layer(positions, h, meta, kv, rope, adapters)
        normed = rms_norm(h, self.model.norm.weight, self.config.rms_norm_eps)
        return (
            normed if adapters is None else adapters.renorm("model.norm", normed, h, self.config.rms_norm_eps)
        )
