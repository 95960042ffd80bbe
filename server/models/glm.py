"""GLM (`GlmForCausalLM`, GLM-4-9B-chat's family) and GLM-4 (`Glm4ForCausalLM`, GLM-4-0414): the
Llama forward pass with GPT-J's interleaved RoPE on part of each head (half by default), q/k/v biases
and gate|up fused on disk (our fused projection as it is); GLM-4 adds an RMSNorm after attention and
after the MLP, before each residual add (config: server/models/glm_config.py)."""

from __future__ import annotations

import torch

from sloth_kernels.norm import add_rms_norm, rms_norm

from .config import ModelConfig
from .layers import StepMetadata
from .llama import DecoderLayer, LlamaForCausalLM, RMSNorm
from .per_adapter import AdapterStep


class Glm4DecoderLayer(DecoderLayer):
    """The Llama layer with GLM-4's norms of the attention and MLP outputs (post_self_attn_layernorm,
    post_mlp_layernorm) before they join the residual."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__(cfg, index)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _norm(
        self, name: str, h: torch.Tensor, residual: torch.Tensor | None, adapters: AdapterStep | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = add_rms_norm(h, residual, getattr(self, name).weight, self.eps)
        if adapters is not None:  # an adapter's own norm weight, for its tokens
            normed = adapters.renorm(f"{self.prefix}.{name}", normed, residual, self.eps)
        return normed, residual

    def _post_norm(self, name: str, h: torch.Tensor, adapters: AdapterStep | None) -> torch.Tensor:
        normed = rms_norm(h, getattr(self, name).weight, self.eps)
        return normed if adapters is None else adapters.renorm(f"{self.prefix}.{name}", normed, h, self.eps)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        meta: StepMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        adapters: AdapterStep | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self._norm("input_layernorm", h, residual, adapters)
        h = self._post_norm(
            "post_self_attn_layernorm", self.self_attn(positions, h, meta, kv_cache, rope, adapters), adapters
        )
        h, residual = self._norm("post_attention_layernorm", h, residual, adapters)
        return self._post_norm("post_mlp_layernorm", self.mlp(h, meta), adapters), residual


class Glm4ForCausalLM(LlamaForCausalLM):
    layer_class = Glm4DecoderLayer
