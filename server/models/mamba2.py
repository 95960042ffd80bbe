"""The pieces the Mamba-2 hybrids (Granite 4, Falcon-H1) share: the Mamba-2 mixer over a flat batch
(in_proj to z | x B C | dt; causal conv + SiLU on x B C with a per-sequence conv state; the SSD scan
with a per-sequence SSM state; gated RMSNorm; out_proj), their attention (Granite's scale and optional
RoPE, Falcon-H1's key multiplier), and a base class holding the state tensors, one row per state slot
of the engine's state cache (server/engine/state_cache.py), and the embedding / logits multipliers."""

from __future__ import annotations

import torch
from torch import nn

from sloth_kernels.attention import paged_attention, write_kv
from sloth_kernels.conv import causal_conv1d
from sloth_kernels.gated_norm import gated_rms_norm
from sloth_kernels.norm import add_rms_norm
from sloth_kernels.rope import apply_rope, rope_tables
from sloth_kernels.ssd import ssd_chunk_scan, ssd_update
from sloth_kernels.ssm_params import SSMParams
from sloth_kernels.state_batch import StateBatch

from .config import ModelConfig
from .layers import LoRALinear, StepMetadata
from .llama import RMSNorm
from .mamba2_config import Mamba2Config, Multipliers
from .per_adapter import AdapterStep


def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Conv1d(nn.Module):
    """The depthwise convolution's weights under the checkpoint's names (conv1d.weight [D, 1, K])."""

    def __init__(self, dim: int, kernel: int, bias: bool) -> None:
        super().__init__()
        self.weight = _weight(dim, 1, kernel)
        self.bias = _weight(dim) if bias else None


class GatedNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = _weight(dim)


class Mamba2Mixer(nn.Module):
    def __init__(self, m: Mamba2Config, hidden: int, eps: float) -> None:
        super().__init__()
        self.m, self.eps = m, eps
        self.in_proj = LoRALinear(hidden, [2 * m.intermediate_size + 2 * m.num_groups * m.state_size + m.num_heads],
                                  bias=m.proj_bias)
        self.conv1d = Conv1d(m.conv_dim, m.conv_kernel, m.conv_bias)
        self.dt_bias, self.A_log, self.D = _weight(m.num_heads), _weight(m.num_heads), _weight(m.num_heads)
        self.norm = GatedNorm(m.intermediate_size) if m.gated_norm else None
        self.out_proj = LoRALinear(m.intermediate_size, [hidden], bias=m.out_bias)

    def forward(self, x: torch.Tensor, meta: StepMetadata, conv_state: torch.Tensor,
                ssm_state: torch.Tensor) -> torch.Tensor:
        m, batch = self.m, meta.state
        assert batch is not None, "a Mamba-2 layer needs the step's state metadata"
        inter, bc = m.intermediate_size, m.num_groups * m.state_size
        proj = self.in_proj(x * m.in_multiplier if m.in_multiplier != 1.0 else x, meta)
        self._scale_sections(proj)
        z, xbc, dt = proj.split([inter, m.conv_dim, m.num_heads], dim=-1)
        xbc = nn.functional.silu(causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv_state,
                                               batch))
        xs, b, c = xbc.split([inter, bc, bc], dim=-1)
        num_tokens = x.shape[0]
        params = SSMParams(-torch.exp(self.A_log.float()), self.D, self.dt_bias, m.dt_min, m.dt_max)
        shaped = (xs.view(num_tokens, m.num_heads, m.head_dim), dt, b.view(num_tokens, m.num_groups, m.state_size),
                  c.view(num_tokens, m.num_groups, m.state_size))
        if _all_decodes(batch):
            y = ssd_update(*shaped, params, ssm_state, batch.slots)
        else:
            y = ssd_chunk_scan(*shaped, params, ssm_state, batch.query_start_loc, batch.slots, batch.has_initial)
        y = y.view(num_tokens, inter)
        if self.norm is not None:
            y = gated_rms_norm(y, z, self.norm.weight, self.eps, inter // m.norm_groups, m.norm_before_gate)
        else:
            y = y * nn.functional.silu(z)
        out = self.out_proj(y, meta)
        return out * m.out_multiplier if m.out_multiplier != 1.0 else out

    def _scale_sections(self, proj: torch.Tensor) -> None:
        """Falcon-H1's µP: in_proj's z, x, B, C and dt sections each times its multiplier (after LoRA,
        as transformers applies it to the whole projection)."""
        m = self.m
        bc = m.num_groups * m.state_size
        start = 0
        for size, mult in zip((m.intermediate_size, m.intermediate_size, bc, bc, m.num_heads),
                              m.zxbcdt_multipliers, strict=True):
            if mult != 1.0:
                proj[:, start : start + size] *= mult
            start += size


def _all_decodes(batch: StateBatch) -> bool:
    """One token per sequence, each continuing its state: the one-step update (no scan). A decode
    CUDA graph's batch (server/engine/cuda_graphs.py) is one: one token a row, no host flags."""
    qsl = batch.query_start_loc_host
    return all(qsl[i + 1] - qsl[i] == 1 for i in range(len(qsl) - 1)) and all(batch.has_initial_host)


class HybridAttention(nn.Module):
    """Grouped-query attention over the paged KV cache with the hybrids' options: the config's scale
    (Granite's attention_multiplier), no RoPE (Granite-4.0-H), a key multiplier (Falcon-H1)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        self.rope = cfg.rope_enabled
        self.key_multiplier = cfg.multipliers.key if cfg.multipliers is not None else 1.0
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = LoRALinear(cfg.hidden_size, [q_size, kv_size, kv_size], bias=cfg.qkv_bias)
        self.o_proj = LoRALinear(q_size, [cfg.hidden_size], bias=cfg.o_bias)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: StepMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x, meta).split([q_size, kv_size, kv_size], dim=-1)
        if self.key_multiplier != 1.0:
            k = k * self.key_multiplier
        q, k = q.view(-1, self.num_heads, self.head_dim), k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.rope:
            q, k = apply_rope(q, k, positions, *rope)
        write_kv(k, v.view(-1, self.num_kv_heads, self.head_dim), *kv_cache, meta.attn.slot_mapping)
        o = paged_attention(q, *kv_cache, meta.attn, self.scale, None)
        return self.o_proj(o.flatten(1), meta)


class HybridBackbone(nn.Module):
    """embed_tokens, the layers and the final norm, under the checkpoint's names (`final_norm`:
    Granite's `norm`, Falcon-H1's `final_layernorm`)."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module], final_norm: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(layers)
        self.final_norm_name = final_norm
        setattr(self, final_norm, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    @property
    def final_norm(self) -> RMSNorm:
        norm = getattr(self, self.final_norm_name)
        assert isinstance(norm, RMSNorm)
        return norm


class Mamba2HybridLM(nn.Module):
    """What both families' models share: the state tensors per Mamba-2 layer, the rotary tables, the
    embedding and logits multipliers. Subclasses build `self.model` and `forward`."""

    def __init__(self, cfg: ModelConfig, backbone: HybridBackbone, num_mamba_layers: int) -> None:
        super().__init__()
        self.config, self.model, self.num_mamba_layers = cfg, backbone, num_mamba_layers
        self.multipliers = cfg.multipliers or Multipliers()
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)
        cos, sin = rope_tables(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # per Mamba-2 layer: conv state [slots, conv_dim, K - 1] and SSM state [slots, H, P, N]
        self.mamba_states: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _state_shapes(self, num_slots: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = self.config.mamba
        assert m is not None
        return (num_slots, m.conv_dim, m.conv_kernel - 1), (num_slots, m.num_heads, m.head_dim, m.state_size)

    def state_bytes_per_slot(self, dtype: torch.dtype) -> int:
        conv, ssm = self._state_shapes(1)
        conv_bytes = torch.Size(conv).numel() * torch.empty((), dtype=dtype).element_size()
        return self.num_mamba_layers * (conv_bytes + 4 * torch.Size(ssm).numel())  # the SSM state is float32

    def allocate_state(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        """The conv state holds inputs (the activation dtype); the SSM state accumulates over the whole
        sequence, so it stays float32 (as transformers' scan leaves it) instead of rounding every step."""
        conv, ssm = self._state_shapes(num_slots)
        self.mamba_states = [(torch.zeros(conv, dtype=dtype, device=device),
                              torch.zeros(ssm, dtype=torch.float32, device=device))
                             for _ in range(self.num_mamba_layers)]

    def state_tensors(self) -> list[torch.Tensor]:
        """Every state tensor, one row per slot (prefix-cache snapshots copy rows of each): the conv
        state and the float32 SSM state of each Mamba-2 layer."""
        return [t for pair in self.mamba_states for t in pair]

    def lora_layers(self) -> dict[str, LoRALinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, LoRALinear)}

    def embed(self, input_ids: torch.Tensor, adapters: AdapterStep | None) -> torch.Tensor:
        table = self.model.embed_tokens
        h = table(input_ids) if adapters is None else adapters.embed(table, input_ids)
        return h * self.multipliers.embedding if self.multipliers.embedding != 1.0 else h

    def final_norm(self, h: torch.Tensor, residual: torch.Tensor | None, adapters: AdapterStep | None) -> torch.Tensor:
        norm, eps = self.model.final_norm, self.config.rms_norm_eps
        h, residual = add_rms_norm(h, residual, norm.weight, eps)
        return h if adapters is None else adapters.renorm(f"model.{self.model.final_norm_name}", h, residual, eps)

    def compute_logits(self, hidden: torch.Tensor, adapters: AdapterStep | None = None) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = adapters.logits(hidden, weight) if adapters is not None else nn.functional.linear(hidden, weight).float()
        return logits * self.multipliers.logits if self.multipliers.logits != 1.0 else logits
