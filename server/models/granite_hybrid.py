"""Our forward pass for Granite 4 (GraniteMoeHybridForCausalLM): per `layer_types` a Mamba-2 mixer
(server/models/mamba2.py) or attention (attention_multiplier as its scale, RoPE only when
position_embedding_type is "rope"), then a MoE (top-k softmax routing) plus the shared MLP, or the
shared MLP alone (num_local_experts 0); each block's output times residual_multiplier before the
residual add, the embedding times embedding_multiplier, logits divided by logits_scaling."""

from __future__ import annotations

import torch
from torch import nn

from sloth_kernels.moe import route
from sloth_kernels.norm import add_rms_norm

from .config import ModelConfig
from .layers import LoRALinear, StepMetadata
from .llama import RMSNorm
from .mamba2 import HybridAttention, HybridBackbone, Mamba2HybridLM, Mamba2Mixer
from .mamba2_config import MAMBA
from .moe import Experts, Router
from .per_adapter import AdapterStep


class SharedMLP(nn.Module):
    """input_linear = gate | up stacked (one checkpoint tensor), output_linear = down."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.inter = inter
        self.input_linear = LoRALinear(hidden, [2 * inter])
        self.output_linear = LoRALinear(inter, [hidden])

    def forward(self, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        gate, up = self.input_linear(x, meta).split(self.inter, dim=-1)
        return self.output_linear(nn.functional.silu(gate) * up, meta)


class GraniteMoe(nn.Module):
    """block_sparse_moe (loaded as `mlp`: weights.moe_checkpoint_name): the router's top-k logits
    softmaxed, the experts as 3-D gate|up and down weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = Router(cfg.num_experts, cfg.hidden_size)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # softmax over all then renormalised top-k equals transformers' softmax over the top-k logits
        ids, weights = route(x, self.router.weight, self.top_k, True, False)
        return self.experts(x, ids, weights)


class GraniteHybridLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        assert cfg.layer_types is not None and cfg.multipliers is not None
        self.prefix = f"model.layers.{index}"
        self.is_mamba = cfg.layer_types[index] == MAMBA
        if self.is_mamba:
            assert cfg.mamba is not None
            self.mamba = Mamba2Mixer(cfg.mamba, cfg.hidden_size, cfg.rms_norm_eps)
        else:
            self.self_attn = HybridAttention(cfg)
        self.mlp = GraniteMoe(cfg) if cfg.num_experts > 0 else None
        self.shared_mlp = SharedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps, self.residual_multiplier = cfg.rms_norm_eps, cfg.multipliers.residual

    def _norm(self, name: str, h: torch.Tensor, residual: torch.Tensor | None,
              adapters: AdapterStep | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = add_rms_norm(h, residual, getattr(self, name).weight, self.eps)
        return (h if adapters is None else adapters.renorm(f"{self.prefix}.{name}", h, residual, self.eps)), residual

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, meta: StepMetadata,
                cache: tuple[torch.Tensor, torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
                adapters: AdapterStep | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`cache`: the layer's (conv state, SSM state) for a Mamba layer, its (K, V) caches otherwise.
        Returns (this block's scaled output, the residual stream before it)."""
        h, residual = self._norm("input_layernorm", h, residual, adapters)
        h = self.mamba(h, meta, *cache) if self.is_mamba else self.self_attn(positions, h, meta, cache, rope)
        h, residual = self._norm("post_attention_layernorm", h * self.residual_multiplier, residual, adapters)
        out = self.shared_mlp(h, meta)
        if self.mlp is not None:
            out = self.mlp(h) + out
        return out * self.residual_multiplier, residual


class GraniteMoeHybridForCausalLM(Mamba2HybridLM):
    def __init__(self, cfg: ModelConfig) -> None:
        layers: list[nn.Module] = [GraniteHybridLayer(cfg, i) for i in range(cfg.num_layers)]
        super().__init__(cfg, HybridBackbone(cfg, layers, "norm"), cfg.num_layers - len(cfg.kv_layers))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None,
    ) -> torch.Tensor:
        """Final hidden states; `kv_caches` holds the attention layers' caches only, in order."""
        h, residual = self.embed(input_ids, adapters), None
        rope = (self.rope_cos, self.rope_sin)
        kv, states = iter(kv_caches), iter(self.mamba_states)
        for layer in self.model.layers:
            cache = next(states) if layer.is_mamba else next(kv)
            h, residual = layer(positions, h, residual, meta, cache, rope, adapters)
        return self.final_norm(h, residual, adapters)
