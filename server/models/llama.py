"""Our forward pass for the Llama family (llama, mistral, qwen2, qwen3, phi3, glm, and the attention of
gpt-oss: per-layer sliding windows, an o_proj bias, attention sinks) over a flat batch of tokens from
many sequences, reading and writing the paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from sloth_kernels.attention import paged_attention, write_kv
from sloth_kernels.norm import add_rms_norm, rms_norm
from sloth_kernels.rope import apply_rope, rope_tables

from .config import ModelConfig
from .layers import LoRALinear, StepMetadata
from .moe import SparseMoeBlock
from .per_adapter import AdapterStep


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str = "", index: int = 0) -> None:
        super().__init__()
        self.prefix = prefix  # the module's name, which adapters' own q_norm / k_norm weights go by
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.layer_windows[index] if cfg.layer_windows is not None else cfg.sliding_window
        self.use_rope = cfg.rope_layers is None or cfg.rope_layers[index]  # SmolLM3's NoPE layers: False
        self.rope_interleaved, self.rope_fp32 = cfg.rope_interleaved, cfg.rope_fp32  # GLM, Cohere
        self.temperature = cfg.attn_temperature  # Ministral 3
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = LoRALinear(cfg.hidden_size, [q_size, kv_size, kv_size], bias=cfg.qkv_bias)
        self.o_proj = LoRALinear(q_size, [cfg.hidden_size], bias=cfg.o_bias)
        # gpt-oss: each head's sink logit (sloth_kernels.attention); a checkpoint tensor like any weight.
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads), requires_grad=False) if cfg.attn_sinks else None
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.eps = cfg.rms_norm_eps

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        meta: StepMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        adapters: AdapterStep | None = None,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x, meta)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q_in, k_in = q, k
            q = rms_norm(q_in, self.q_norm.weight, self.eps)
            k = rms_norm(k_in, self.k_norm.weight, self.eps)
            if adapters is not None:
                q = adapters.renorm(f"{self.prefix}.q_norm", q, q_in, self.eps)
                k = adapters.renorm(f"{self.prefix}.k_norm", k, k_in, self.eps)
        if self.use_rope:
            q, k = apply_rope(q, k, positions, *rope, interleaved=self.rope_interleaved, fp32=self.rope_fp32)
        if self.temperature is not None:  # in float32, rounded to q's dtype, as transformers does
            beta, length = self.temperature
            q = q * (1 + beta * torch.log(1 + torch.floor(positions / length))).to(q.dtype)[:, None, None]
        k_cache, v_cache = kv_cache
        write_kv(k, v, k_cache, v_cache, meta.attn.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta.attn, self.scale, self.sliding_window, sinks=self.sinks)
        return self.o_proj(o.flatten(1), meta)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = LoRALinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = LoRALinear(cfg.intermediate_size, [cfg.hidden_size])

    def forward(self, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, meta).split(self.intermediate_size, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up, meta)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.prefix = f"model.layers.{index}"
        self.self_attn = Attention(cfg, f"{self.prefix}.self_attn", index)
        self.mlp: MLP | SparseMoeBlock = SparseMoeBlock(cfg) if cfg.is_moe_layer(index) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

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
        h, residual = add_rms_norm(h, residual, self.input_layernorm.weight, self.eps)
        if adapters is not None:
            h = adapters.renorm(f"{self.prefix}.input_layernorm", h, residual, self.eps)
        h = self.self_attn(positions, h, meta, kv_cache, rope, adapters)
        h, residual = add_rms_norm(h, residual, self.post_attention_layernorm.weight, self.eps)
        if adapters is not None:
            h = adapters.renorm(f"{self.prefix}.post_attention_layernorm", h, residual, self.eps)
        return self.mlp(h, meta), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_class: type[nn.Module] = DecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(layer_class(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    layer_class: type[nn.Module] = DecoderLayer  # a family with its own decoder layer (gpt-oss) names it

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, self.layer_class)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)
        cos, sin = rope_tables(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def lora_layers(self) -> dict[str, LoRALinear]:
        """LoRA-capable projections by the module names PEFT adapters use for them."""
        return {name: m for name, m in self.named_modules() if isinstance(m, LoRALinear)}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None,
    ) -> torch.Tensor:
        """Final hidden states. `adapters`: the step's adapters with their own embed_tokens / norms,
        applied to their tokens only (None, as in every CUDA graph: the base's modules throughout)."""
        return self.forward_embeds(self.embed(input_ids, adapters), positions, meta, kv_caches, adapters)

    def embed(self, input_ids: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        table = self.model.embed_tokens
        return table(input_ids) if adapters is None else adapters.embed(table, input_ids)

    def forward_embeds(self, h: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                       adapters: AdapterStep | None = None) -> torch.Tensor:
        """Final hidden states from the first layer's input (image-text models splice theirs in)."""
        residual: torch.Tensor | None = None
        rope = (self.rope_cos, self.rope_sin)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            h, residual = layer(positions, h, residual, meta, kv, rope, adapters)
        eps = self.config.rms_norm_eps
        h, residual = add_rms_norm(h, residual, self.model.norm.weight, eps)
        return h if adapters is None else adapters.renorm("model.norm", h, residual, eps)

    def compute_logits(self, hidden: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        """float32 logits; with `adapters`, rows of an adapter with its own lm_head go through it and
        the width is the batch's widest vocabulary (narrower rows padded with -inf)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if adapters is not None:
            return adapters.logits(hidden, weight)
        return nn.functional.linear(hidden, weight).float()
