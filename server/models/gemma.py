"""Our forward pass for Gemma 2 and Gemma 3 (text) over a flat batch of tokens from many sequences,
on the paged KV cache: (1 + w) RMSNorms before and after attention and MLP, GeGLU, an embedding
scaled by sqrt(hidden), local sliding-window layers interleaved with global ones (Gemma 3: each
kind with its own RoPE base), attention and final-logit soft-capping (Gemma 2), q/k norm (Gemma 3)."""

from __future__ import annotations

import torch
from torch import nn

from sloth_kernels.attention import paged_attention, write_kv
from sloth_kernels.norm import gemma_add_rms_norm, gemma_rms_norm
from sloth_kernels.rope import apply_rope, rope_tables

from .config import ModelConfig
from .layers import LoRALinear, StepMetadata
from .per_adapter import AdapterStep

Rope = tuple[torch.Tensor, torch.Tensor]


class GemmaRMSNorm(nn.Module):
    """`weight` is w as the checkpoint holds it (what adapters and merges read and replace); the
    forward pass multiplies by 1 + w in float32, as transformers does, computed once per weight."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size), requires_grad=False)
        self.eps = eps
        self._scale: torch.Tensor | None = None
        self._scale_of: torch.Tensor | None = None  # the weight _scale was computed from

    @property
    def scale(self) -> torch.Tensor:
        stale = self._scale is None or self._scale.device != self.weight.device
        if stale or self._scale_of is not self.weight:  # first use, or the weight was replaced (--merge-lora)
            self._scale, self._scale_of = 1.0 + self.weight.float(), self.weight
        assert self._scale is not None
        return self._scale


def renorm(adapters: AdapterStep | None, name: str, normed: torch.Tensor, x: torch.Tensor,
           eps: float) -> torch.Tensor:
    """`normed` with the rows of each adapter that brings its own norm `name` normalized with it."""
    if adapters is None:
        return normed
    for g in adapters.groups:
        w = g.modules.norms.get(name)
        if w is not None:
            rows = gemma_rms_norm(x.index_select(0, g.token_rows), 1.0 + w.float(), eps)
            normed.index_copy_(0, g.token_rows, rows)
    return normed


class GemmaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, prefix: str) -> None:
        super().__init__()
        assert cfg.layer_windows is not None
        self.prefix = prefix
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        self.softcap = cfg.attn_softcap
        self.sliding_window = cfg.layer_windows[index]
        # Gemma 3's local layers rotate with their own base; Gemma 2's share the global tables.
        self.local_rope = self.sliding_window is not None and cfg.local_rope_theta is not None
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = LoRALinear(cfg.hidden_size, [q_size, kv_size, kv_size], bias=cfg.qkv_bias)
        self.o_proj = LoRALinear(q_size, [cfg.hidden_size], bias=cfg.qkv_bias)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.eps = cfg.rms_norm_eps

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: StepMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], rope: Rope, adapters: AdapterStep | None) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x, meta).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = renorm(adapters, f"{self.prefix}.q_norm", gemma_rms_norm(q, self.q_norm.scale, self.eps), q, self.eps)
            k = renorm(adapters, f"{self.prefix}.k_norm", gemma_rms_norm(k, self.k_norm.scale, self.eps), k, self.eps)
        q, k = apply_rope(q, k, positions, *rope)
        k_cache, v_cache = kv_cache
        write_kv(k, v, k_cache, v_cache, meta.attn.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta.attn, self.scale, self.sliding_window, self.softcap)
        return self.o_proj(o.flatten(1), meta)


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate) * up)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = LoRALinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = LoRALinear(cfg.intermediate_size, [cfg.hidden_size])

    def forward(self, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, meta).split(self.intermediate_size, dim=-1)
        return self.down_proj(nn.functional.gelu(gate, approximate="tanh") * up, meta)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.prefix = f"model.layers.{index}"
        self.self_attn = GemmaAttention(cfg, index, f"{self.prefix}.self_attn")
        self.mlp = GemmaMLP(cfg)
        size, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.eps = eps

    def _norm(self, name: str, x: torch.Tensor, adapters: AdapterStep | None) -> torch.Tensor:
        out = gemma_rms_norm(x, getattr(self, name).scale, self.eps)
        return renorm(adapters, f"{self.prefix}.{name}", out, x, self.eps)

    def _add_norm(self, name: str, x: torch.Tensor, residual: torch.Tensor | None,
                  adapters: AdapterStep | None) -> tuple[torch.Tensor, torch.Tensor]:
        out, total = gemma_add_rms_norm(x, residual, getattr(self, name).scale, self.eps)
        return renorm(adapters, f"{self.prefix}.{name}", out, total, self.eps), total

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, meta: StepMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], ropes: tuple[Rope, Rope],
                adapters: AdapterStep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`h`: the previous layer's output, already post-normed; the residual add is fused into this
        layer's first norm. Returns (this layer's post-normed MLP output, the residual stream)."""
        h, residual = self._add_norm("input_layernorm", h, residual, adapters)
        attn = self.self_attn
        h = attn(positions, h, meta, kv_cache, ropes[1] if attn.local_rope else ropes[0], adapters)
        h = self._norm("post_attention_layernorm", h, adapters)
        h, residual = self._add_norm("pre_feedforward_layernorm", h, residual, adapters)
        h = self.mlp(h, meta)
        return self._norm("post_feedforward_layernorm", h, adapters), residual


class GemmaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GemmaForCausalLM(nn.Module):
    """Same interface as LlamaForCausalLM (forward -> final hidden states, compute_logits)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = GemmaBackbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)
        self._embed_scale: tuple[torch.dtype, float] | None = None
        for prefix, (cos, sin) in gemma_rope_tables(cfg).items():
            self.register_buffer(f"{prefix}rope_cos", cos, persistent=False)
            self.register_buffer(f"{prefix}rope_sin", sin, persistent=False)

    def lora_layers(self) -> dict[str, LoRALinear]:
        """LoRA-capable projections by the module names PEFT adapters use for them."""
        return {name: m for name, m in self.named_modules() if isinstance(m, LoRALinear)}

    def post_load(self) -> None:
        """After the weights are in: compute every norm's 1 + w now rather than in the first step
        (which may be a CUDA-graph capture)."""
        for m in self.modules():
            if isinstance(m, GemmaRMSNorm):
                m.scale  # noqa: B018 (computes and caches)

    def embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden) rounded to the weights' dtype first, as transformers multiplies by it."""
        if self._embed_scale is None or self._embed_scale[0] != dtype:
            self._embed_scale = (dtype, torch.tensor(self.config.hidden_size**0.5, dtype=dtype).item())
        return self._embed_scale[1]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None) -> torch.Tensor:
        """Final hidden states. `adapters`: the step's adapters with their own embed_tokens / norms."""
        return self.forward_embeds(self.embed(input_ids, adapters), positions, meta, kv_caches, adapters)

    def embed(self, input_ids: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        """The tokens' embeddings, scaled by sqrt(hidden)."""
        table = self.model.embed_tokens
        h = table(input_ids) if adapters is None else adapters.embed(table, input_ids)
        return h * self.embed_scale(table.weight.dtype)

    def forward_embeds(self, h: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                       adapters: AdapterStep | None = None) -> torch.Tensor:
        """Final hidden states from the first layer's input (image-text models splice theirs in)."""
        residual: torch.Tensor | None = None
        rope = (self.rope_cos, self.rope_sin)
        ropes = (rope, (self.local_rope_cos, self.local_rope_sin) if hasattr(self, "local_rope_cos") else rope)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            h, residual = layer(positions, h, residual, meta, kv, ropes, adapters)
        eps = self.config.rms_norm_eps
        h, residual = gemma_add_rms_norm(h, residual, self.model.norm.scale, eps)
        return renorm(adapters, "model.norm", h, residual, eps)

    def compute_logits(self, hidden: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        """float32 logits, soft-capped where the config says (Gemma 2)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = adapters.logits(hidden, weight) if adapters is not None else nn.functional.linear(hidden, weight).float()
        cap = self.config.final_softcap
        if cap is None:
            return logits
        capped = torch.tanh(logits / cap) * cap
        # Rows narrower than an adapter's vocabulary are padded with -inf: keep those out of reach.
        return capped if adapters is None else capped.masked_fill_(logits == float("-inf"), float("-inf"))


def gemma_rope_tables(cfg: ModelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Buffer prefix -> float32 (cos, sin): the global layers' tables, and the local layers' when
    they rotate with another base (Gemma 3)."""
    positions = cfg.max_position_embeddings
    tables = {"": rope_tables(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, positions)}
    if cfg.local_rope_theta is not None:
        tables["local_"] = rope_tables(cfg.head_dim, cfg.local_rope_theta, cfg.local_rope_scaling, positions)
    return tables
