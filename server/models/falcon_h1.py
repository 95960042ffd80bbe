"""Our forward pass for Falcon-H1 (FalconH1ForCausalLM): in every layer a Mamba-2 mixer and attention
read the same normed input (attention's scaled by attention_in_multiplier) and their outputs, each
times its multiplier, are added to the residual; then a SwiGLU MLP with gate and down multipliers.
Every layer has a KV cache and a state; the embedding and the logits have their multipliers too."""

from __future__ import annotations

import torch
from torch import nn

from sloth_kernels.norm import add_rms_norm

from .config import ModelConfig
from .layers import LoRALinear, StepMetadata
from .llama import RMSNorm
from .mamba2 import HybridAttention, HybridBackbone, Mamba2HybridLM, Mamba2Mixer
from .per_adapter import AdapterStep


class FalconH1MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.multipliers is not None
        self.inter = cfg.intermediate_size
        self.gate_up_proj = LoRALinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=cfg.mlp_bias)
        self.down_proj = LoRALinear(cfg.intermediate_size, [cfg.hidden_size], bias=cfg.mlp_bias)
        self.gate_multiplier, self.down_multiplier = cfg.multipliers.mlp_gate, cfg.multipliers.mlp_down

    def forward(self, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, meta).split(self.inter, dim=-1)
        return self.down_proj(up * nn.functional.silu(gate * self.gate_multiplier), meta) * self.down_multiplier


class FalconH1Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        assert cfg.mamba is not None and cfg.multipliers is not None
        self.prefix = f"model.layers.{index}"
        self.mamba = Mamba2Mixer(cfg.mamba, cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = HybridAttention(cfg)
        self.feed_forward = FalconH1MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps
        self.attention_in, self.attention_out = cfg.multipliers.attention_in, cfg.multipliers.attention_out

    def _norm(self, name: str, h: torch.Tensor, residual: torch.Tensor | None,
              adapters: AdapterStep | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = add_rms_norm(h, residual, getattr(self, name).weight, self.eps)
        return (h if adapters is None else adapters.renorm(f"{self.prefix}.{name}", h, residual, self.eps)), residual

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, meta: StepMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], state: tuple[torch.Tensor, torch.Tensor],
                rope: tuple[torch.Tensor, torch.Tensor], adapters: AdapterStep | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self._norm("input_layernorm", h, residual, adapters)
        mixed = self.mamba(h, meta, *state)
        attn_in = h * self.attention_in if self.attention_in != 1.0 else h
        attn = self.self_attn(positions, attn_in, meta, kv_cache, rope)
        h, residual = self._norm("pre_ff_layernorm", mixed + attn * self.attention_out, residual, adapters)
        return self.feed_forward(h, meta), residual


class FalconH1ForCausalLM(Mamba2HybridLM):
    def __init__(self, cfg: ModelConfig) -> None:
        layers: list[nn.Module] = [FalconH1Layer(cfg, i) for i in range(cfg.num_layers)]
        super().__init__(cfg, HybridBackbone(cfg, layers, "final_layernorm"), cfg.num_layers)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None,
    ) -> torch.Tensor:
        h, residual = self.embed(input_ids, adapters), None
        rope = (self.rope_cos, self.rope_sin)
        for layer, kv, state in zip(self.model.layers, kv_caches, self.mamba_states, strict=True):
            h, residual = layer(positions, h, residual, meta, kv, state, rope, adapters)
        return self.final_norm(h, residual, adapters)
