"""Our forward pass for Qwen3.5's text model (Qwen3_5ForCausalLM): Gated DeltaNet layers (linear
attention with a recurrent state per sequence, after a causal convolution with its own state) and
gated full-attention layers (a sigmoid gate per output, per-head q/k norms, partial RoPE), in the
order of the config's layer_types; every norm scales by 1 + w. Attention layers use the paged KV
cache; each Gated DeltaNet layer keeps, per state slot, its convolution's last K - 1 inputs and its
float32 recurrent state [value heads, key dim, value dim]."""

from __future__ import annotations

import torch
from torch import nn

from sloth_kernels.attention import paged_attention, write_kv
from sloth_kernels.conv import causal_conv1d
from sloth_kernels.gated_delta import gated_delta_rule
from sloth_kernels.norm import gemma_add_rms_norm, gemma_rms_norm
from sloth_kernels.rope import apply_rope, rope_tables

from .config import ModelConfig
from .gemma import renorm
from .layers import LoRALinear, StepMetadata
from .lfm2 import DepthwiseConv
from .llama import MLP, RMSNorm
from .moe import SparseMoeBlock
from .per_adapter import AdapterStep


def scale_of(norm: RMSNorm) -> torch.Tensor:
    """Qwen3.5's norms multiply by 1 + w (w stored zero-centred), in float32."""
    return 1.0 + norm.weight.float()


class GatedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix  # adapters' own q_norm / k_norm weights go by it
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # q_proj holds each head's query and then its gate: [q_0 | gate_0 | q_1 | gate_1 ...]
        self.qkv_proj = LoRALinear(cfg.hidden_size, [2 * q_size, kv_size, kv_size], bias=cfg.qkv_bias)
        self.o_proj = LoRALinear(q_size, [cfg.hidden_size], bias=cfg.qkv_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: StepMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
                adapters: AdapterStep | None) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qg, k, v = self.qkv_proj(x, meta).split([2 * q_size, kv_size, kv_size], dim=-1)
        qg = qg.view(-1, self.num_heads, 2 * self.head_dim)
        q_in, gate = qg[..., : self.head_dim], qg[..., self.head_dim :]
        k_in = k.view(-1, self.num_kv_heads, self.head_dim)
        q = renorm(adapters, f"{self.prefix}.q_norm", gemma_rms_norm(q_in, scale_of(self.q_norm), self.eps), q_in, self.eps)
        k = renorm(adapters, f"{self.prefix}.k_norm", gemma_rms_norm(k_in, scale_of(self.k_norm), self.eps), k_in, self.eps)
        q, k = apply_rope(q, k, positions, *rope)
        write_kv(k, v.view(-1, self.num_kv_heads, self.head_dim), *kv_cache, meta.attn.slot_mapping)
        o = paged_attention(q, *kv_cache, meta.attn, self.scale, None)
        return self.o_proj(o.flatten(1) * torch.sigmoid(gate.flatten(1)), meta)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        (self.num_k_heads, self.num_v_heads), (self.k_dim, self.v_dim) = cfg.linear_heads, cfg.linear_head_dims
        self.key_size, self.value_size = self.num_k_heads * self.k_dim, self.num_v_heads * self.v_dim
        conv_dim = 2 * self.key_size + self.value_size
        self.in_proj_qkv = LoRALinear(cfg.hidden_size, [conv_dim])
        self.in_proj_z = LoRALinear(cfg.hidden_size, [self.value_size])
        self.in_proj_b = LoRALinear(cfg.hidden_size, [self.num_v_heads])
        self.in_proj_a = LoRALinear(cfg.hidden_size, [self.num_v_heads])
        self.conv1d = DepthwiseConv(conv_dim, cfg.conv_kernel, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads), requires_grad=False)
        self.norm = RMSNorm(self.v_dim, cfg.rms_norm_eps)  # gated, plain weight (not 1 + w)
        self.out_proj = LoRALinear(self.value_size, [cfg.hidden_size])
        self.eps = cfg.rms_norm_eps

    def forward(self, x: torch.Tensor, meta: StepMetadata, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        assert meta.state is not None, "a Gated DeltaNet layer needs the step's state metadata"
        conv_state, recurrent = state
        mixed = causal_conv1d(self.in_proj_qkv(x, meta), self.conv1d.weight.squeeze(1), None, conv_state,
                              meta.state, silu=True)
        q, k, v = mixed.split([self.key_size, self.key_size, self.value_size], dim=-1)
        q, k = q.reshape(-1, self.num_k_heads, self.k_dim), k.reshape(-1, self.num_k_heads, self.k_dim)
        if self.num_v_heads != self.num_k_heads:  # each key head serves a group of value heads
            q = q.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=1)
            k = k.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=1)
        beta = self.in_proj_b(x, meta).sigmoid()
        # The decay's log, in float32 (exp of A_log in 16-bit could overflow), as transformers computes it.
        g = -self.A_log.float().exp() * nn.functional.softplus(self.in_proj_a(x, meta).float() + self.dt_bias)
        o = gated_delta_rule(q, k, v.reshape(-1, self.num_v_heads, self.v_dim), g, beta, recurrent, meta.state)
        z = self.in_proj_z(x, meta).view(-1, self.num_v_heads, self.v_dim)
        return self.out_proj(self._gated_norm(o, z).flatten(1), meta)

    def _gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm over each head's values (rounded, then scaled), times SiLU(z) in float32, rounded once."""
        of = o.float()
        normed = self.norm.weight * (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)).to(o.dtype)
        return (normed * nn.functional.silu(z.float())).to(o.dtype)


class Qwen3_5Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        assert cfg.layer_types is not None
        self.prefix = f"model.layers.{index}"
        self.is_attention = cfg.layer_types[index] == "full_attention"
        if self.is_attention:
            self.self_attn = GatedAttention(cfg, f"{self.prefix}.self_attn")
        else:
            self.linear_attn = GatedDeltaNet(cfg)
        self.mlp: MLP | SparseMoeBlock = SparseMoeBlock(cfg) if cfg.is_moe_layer(index) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, meta: StepMetadata,
                cache: tuple[torch.Tensor, torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
                adapters: AdapterStep | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = gemma_add_rms_norm(h, residual, scale_of(self.input_layernorm), self.eps)
        h = renorm(adapters, f"{self.prefix}.input_layernorm", h, residual, self.eps)
        if self.is_attention:
            h = self.self_attn(positions, h, meta, cache, rope, adapters)
        else:
            h = self.linear_attn(h, meta, cache)
        h, residual = gemma_add_rms_norm(h, residual, scale_of(self.post_attention_layernorm), self.eps)
        h = renorm(adapters, f"{self.prefix}.post_attention_layernorm", h, residual, self.eps)
        return self.mlp(h, meta), residual


class Qwen3_5Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Qwen3_5Layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3_5ForCausalLM(nn.Module):

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3_5Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)
        cos, sin = rope_tables(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.states: list[tuple[torch.Tensor, torch.Tensor]] = []  # per Gated DeltaNet layer: (conv, recurrent)

    def _state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cfg = self.config
        (nk, nv), (dk, dv) = cfg.linear_heads, cfg.linear_head_dims
        return (2 * nk * dk + nv * dv, cfg.conv_kernel - 1), (nv, dk, dv)

    def state_bytes_per_slot(self, dtype: torch.dtype) -> int:
        conv, recurrent = self._state_shapes()
        conv_bytes = conv[0] * conv[1] * torch.empty((), dtype=dtype).element_size()
        per_layer = conv_bytes + 4 * recurrent[0] * recurrent[1] * recurrent[2]  # the recurrent state is float32
        return (self.config.num_layers - len(self.config.kv_layers)) * per_layer

    def allocate_state(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        conv, recurrent = self._state_shapes()
        self.states = [(torch.zeros(num_slots, *conv, dtype=dtype, device=device),
                        torch.zeros(num_slots, *recurrent, dtype=torch.float32, device=device))
                       for _ in range(self.config.num_layers - len(self.config.kv_layers))]

    def state_tensors(self) -> list[torch.Tensor]:
        """Every state tensor, one row per slot (prefix-cache snapshots copy rows of each)."""
        return [t for pair in self.states for t in pair]

    def lora_layers(self) -> dict[str, LoRALinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, LoRALinear)}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None,
    ) -> torch.Tensor:
        """Final hidden states; `kv_caches` holds the attention layers' caches only, in order.
        `adapters`: their own embed_tokens, norms (1 + w, as the base's) and lm_head (in compute_logits);
        the Gated DeltaNet's gated norm is the base's for every request."""
        h = self.embed(input_ids, adapters)
        return self.forward_embeds(h, positions, meta, kv_caches, adapters)

    def embed(self, input_ids: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) if adapters is None else adapters.embed(self.model.embed_tokens, input_ids)

    def forward_embeds(
        self, h: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The layers from the input embeddings `h`; `rope`: the step's own rotary tables, which
        `positions` index (M-RoPE with images: one row per token), instead of the model's."""
        residual: torch.Tensor | None = None
        if rope is None:
            rope = (self.rope_cos, self.rope_sin)  # type: ignore[assignment]
        kv, states = iter(kv_caches), iter(self.states)
        for layer in self.model.layers:
            h, residual = layer(positions, h, residual, meta, next(kv) if layer.is_attention else next(states), rope,
                                adapters)
        eps = self.config.rms_norm_eps
        h, residual = gemma_add_rms_norm(h, residual, scale_of(self.model.norm), eps)
        return renorm(adapters, "model.norm", h, residual, eps)

    def compute_logits(self, hidden: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if adapters is not None:
            return adapters.logits(hidden, weight)
        return nn.functional.linear(hidden, weight).float()
