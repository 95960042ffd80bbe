"""Our forward pass for LFM2 (Lfm2ForCausalLM): gated short-convolution layers (in_proj to B, C, x;
y = C * conv(B * x); out_proj) and grouped-query attention layers with per-head q/k norms, in the
order of the config's layer_types; LFM2-MoE (Lfm2MoeForCausalLM) swaps the feed-forward of every
layer after the first num_dense_layers for experts (server/models/moe.py) behind a sigmoid router. Attention layers read and write the paged KV cache; each
convolution layer keeps the last conv_kernel - 1 inputs of every running sequence in its state
tensor, one row per state slot (server/engine/state_cache.py)."""

from __future__ import annotations

import torch
from torch import nn

from sloth_kernels.attention import paged_attention, write_kv
from sloth_kernels.conv import causal_conv1d
from sloth_kernels.moe import route_sigmoid
from sloth_kernels.norm import add_rms_norm, rms_norm
from sloth_kernels.rope import apply_rope, rope_tables

from .config import ModelConfig
from .layers import LoRALinear, StepMetadata
from .llama import RMSNorm
from .moe import Experts, Router
from .per_adapter import AdapterStep


class DepthwiseConv(nn.Module):
    """The convolution's weights, under the checkpoint's names (conv.weight [D, 1, K])."""

    def __init__(self, dim: int, kernel: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False) if bias else None


class ShortConv(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.in_proj = LoRALinear(cfg.hidden_size, [3 * cfg.hidden_size], bias=cfg.conv_bias)
        self.conv = DepthwiseConv(cfg.hidden_size, cfg.conv_kernel, cfg.conv_bias)
        self.out_proj = LoRALinear(cfg.hidden_size, [cfg.hidden_size], bias=cfg.conv_bias)

    def forward(self, x: torch.Tensor, meta: StepMetadata, conv_state: torch.Tensor) -> torch.Tensor:
        assert meta.state is not None, "a convolution layer needs the step's state metadata"
        b, c, h = self.in_proj(x, meta).split(self.hidden_size, dim=-1)
        y = causal_conv1d(b * h, self.conv.weight.squeeze(1), self.conv.bias, conv_state, meta.state)
        return self.out_proj(c * y, meta)


class Lfm2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = LoRALinear(cfg.hidden_size, [q_size, kv_size, kv_size])
        self.out_proj = LoRALinear(q_size, [cfg.hidden_size])
        self.q_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: StepMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
                adapters: AdapterStep | None) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x, meta).split([q_size, kv_size, kv_size], dim=-1)
        q_in, k_in = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
        q = rms_norm(q_in, self.q_layernorm.weight, self.eps)
        k = rms_norm(k_in, self.k_layernorm.weight, self.eps)
        if adapters is not None:
            q = adapters.renorm(f"{self.prefix}.q_layernorm", q, q_in, self.eps)
            k = adapters.renorm(f"{self.prefix}.k_layernorm", k, k_in, self.eps)
        q, k = apply_rope(q, k, positions, *rope)
        write_kv(k, v.view(-1, self.num_kv_heads, self.head_dim), *kv_cache, meta.attn.slot_mapping)
        o = paged_attention(q, *kv_cache, meta.attn, self.scale, None)
        return self.out_proj(o.flatten(1), meta)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = LoRALinear(cfg.hidden_size, [cfg.intermediate_size])
        self.w3 = LoRALinear(cfg.hidden_size, [cfg.intermediate_size])
        self.w2 = LoRALinear(cfg.intermediate_size, [cfg.hidden_size])

    def forward(self, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x, meta)) * self.w3(x, meta), meta)


class SigmoidMoe(nn.Module):
    """LFM2-MoE's sparse feed-forward: `gate` (the router), `expert_bias` (float32: it only shifts
    which experts are picked) and the SwiGLU experts, under the checkpoint's names."""

    fp32_params = frozenset({"expert_bias"})  # weights.py loads these in float32, whatever the dtype

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.normalize, self.scale = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.gate = Router(cfg.num_experts, cfg.hidden_size)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False) if cfg.expert_bias else None

    def forward(self, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        ids, weights = route_sigmoid(x, self.gate.weight, self.expert_bias, self.top_k, self.normalize, self.scale)
        return self.experts(x, ids, weights, meta)


class Lfm2Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.prefix = f"model.layers.{index}"
        assert cfg.layer_types is not None
        self.is_attention = cfg.layer_types[index] == "full_attention"
        if self.is_attention:
            self.self_attn = Lfm2Attention(cfg, f"{self.prefix}.self_attn")
        else:
            self.conv = ShortConv(cfg)
        self.feed_forward: FeedForward | SigmoidMoe = SigmoidMoe(cfg) if cfg.is_moe_layer(index) else FeedForward(cfg)
        self.operator_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, meta: StepMetadata,
                cache: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                adapters: AdapterStep | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = add_rms_norm(h, residual, self.operator_norm.weight, self.eps)
        if adapters is not None:
            h = adapters.renorm(f"{self.prefix}.operator_norm", h, residual, self.eps)
        if isinstance(cache, tuple):
            h = self.self_attn(positions, h, meta, cache, rope, adapters)
        else:
            h = self.conv(h, meta, cache)
        h, residual = add_rms_norm(h, residual, self.ffn_norm.weight, self.eps)
        if adapters is not None:
            h = adapters.renorm(f"{self.prefix}.ffn_norm", h, residual, self.eps)
        return self.feed_forward(h, meta), residual


class Lfm2Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Lfm2Layer(cfg, i) for i in range(cfg.num_layers))
        self.embedding_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # LFM2's final norm, despite its name


class Lfm2ForCausalLM(nn.Module):

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Lfm2Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)
        cos, sin = rope_tables(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.conv_states: list[torch.Tensor] = []  # per convolution layer [slots, hidden, conv_kernel - 1]

    def state_bytes_per_slot(self, dtype: torch.dtype) -> int:
        cfg = self.config
        num_conv = cfg.num_layers - len(cfg.kv_layers)
        return num_conv * cfg.hidden_size * (cfg.conv_kernel - 1) * torch.empty((), dtype=dtype).element_size()

    def allocate_state(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        cfg = self.config
        shape = (num_slots, cfg.hidden_size, cfg.conv_kernel - 1)
        self.conv_states = [torch.zeros(shape, dtype=dtype, device=device)
                            for _ in range(cfg.num_layers - len(cfg.kv_layers))]

    def state_tensors(self) -> list[torch.Tensor]:
        """Every state tensor, one row per slot (prefix-cache snapshots copy rows of each)."""
        return self.conv_states

    def lora_layers(self) -> dict[str, LoRALinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, LoRALinear)}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None,
    ) -> torch.Tensor:
        """Final hidden states; `kv_caches` holds the attention layers' caches only, in order."""
        h = self.model.embed_tokens(input_ids) if adapters is None else adapters.embed(self.model.embed_tokens, input_ids)
        residual: torch.Tensor | None = None
        rope = (self.rope_cos, self.rope_sin)
        kv, states = iter(kv_caches), iter(self.conv_states)
        for layer in self.model.layers:
            cache = next(kv) if layer.is_attention else next(states)
            h, residual = layer(positions, h, residual, meta, cache, rope, adapters)
        eps = self.config.rms_norm_eps
        h, residual = add_rms_norm(h, residual, self.model.embedding_norm.weight, eps)
        return h if adapters is None else adapters.renorm("model.embedding_norm", h, residual, eps)

    def compute_logits(self, hidden: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if adapters is not None:
            return adapters.logits(hidden, weight)
        return nn.functional.linear(hidden, weight).float()
