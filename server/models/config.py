"""The architecture facts our forward pass needs, read from a Hugging Face config.json."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .exaone4_config import exaone4_fields
from .gemma_config import GEMMA_FAMILIES, gemma_fields
from .glm_config import glm_fields
from .gpt_oss_config import gpt_oss_fields
from .layernorm_config import layernorm_fields
from .lfm2_config import lfm2_fields, lfm2_moe_fields
from .mamba2_config import (
    Mamba2Config,
    Multipliers,
    falcon_h1_fields,
    granite_hybrid_fields,
)
from .mistral3_config import (
    LLAVA_ARCHITECTURE,
    MISTRAL3_ARCHITECTURE,
    PIXTRAL_ARCHITECTURES,
    mistral3_text_config,
    mistral3_vision_fields,
)
from .moe_config import moe_fields
from .phi3_config import phi3_fields
from .qwen3_5_config import qwen3_5_fields, qwen3_5_vision_fields, qwen3_5_vision_on_disk
from .rope_config import attn_temperature, parse_rope
from .smollm3_config import smollm3_fields

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Ministral3ForCausalLM": "mistral",  # Mistral with YaRN and a query scale growing with the position
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # with a vision_config: images too (server/models/gemma_vision.py)
    # Mistral Small 3.1 / 3.2: a Mistral text model with a Pixtral tower (server/models/mistral3_vision.py)
    MISTRAL3_ARCHITECTURE: "mistral",
    LLAVA_ARCHITECTURE: "mistral",  # with a Pixtral tower only (Pixtral-12B); other LLaVA towers are refused
    "Phi3ForCausalLM": "phi3",  # Phi-3, Phi-3.5-mini, Phi-4, Phi-4-mini: fused q|k|v and gate|up on disk
    "Qwen3MoeForCausalLM": "qwen3_moe",  # mixture of experts (server/models/moe.py)
    "Qwen2MoeForCausalLM": "qwen2_moe",  # with a shared expert behind a sigmoid gate
    "MixtralForCausalLM": "mixtral",
    "GlmForCausalLM": "glm",  # GPT-J (interleaved) RoPE on half of each head, q/k/v biases (server/models/glm.py)
    "Glm4ForCausalLM": "glm4",  # the same with norms after attention and MLP
    "CohereForCausalLM": "cohere",  # LayerNorm, parallel attention + MLP, logit scale (server/models/layernorm.py)
    "StableLmForCausalLM": "stablelm",  # LayerNorm with biases, partial rotary
    "Exaone4ForCausalLM": "exaone4",  # q/k norm, norms after attention and MLP, global NoPE (server/models/exaone4.py)
    "SmolLM3ForCausalLM": "smollm3",  # Llama with NoPE layers (server/models/smollm3_config.py)
    "GptOssForCausalLM": "gpt_oss",  # sinks, alternating sliding layers, biased experts (server/models/gpt_oss.py)
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",  # the same with sparse MLPs and a shared expert  # Gated DeltaNet + gated attention, a per-sequence state (server/models/qwen3_5.py)
    # Qwen3.5's image-text checkpoints (as Qwen publishes them and Unsloth saves them): their text model
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Lfm2ForCausalLM": "lfm2",  # short convolutions + attention, with a per-sequence state (server/models/lfm2.py)
    "Lfm2MoeForCausalLM": "lfm2_moe",  # the same with sparse feed-forwards (a sigmoid router, biased picks)
    # Mamba-2 hybrids (server/models/granite_hybrid.py, falcon_h1.py): an SSM state per sequence too
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",
    "FalconH1ForCausalLM": "falcon_h1",
}


def multimodal_text_config(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """The text model's config.json fields of an image-text checkpoint: its `text_config`, with the
    checkpoint-level fields that decide the text model's head (tied embeddings) and dtype."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"config.json text_config: {arch} needs the text model's config as an object, got {text!r:.80}")
    top = {k: cfg[k] for k in ("tie_word_embeddings", "torch_dtype", "dtype") if k in cfg}
    return {**text, **top}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3
    sliding_window: int | None = None  # mistral
    torch_dtype: str = "bfloat16"
    # Gemma 2 / 3 (server/models/gemma_config.py):
    layer_windows: tuple[int | None, ...] | None = None  # each layer's sliding window (None: global)
    attn_scale: float | None = None  # query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    # Ministral 3: (beta, length), queries at position p scaled by 1 + beta * log(1 + floor(p / length))
    attn_temperature: tuple[float, int] | None = None
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    local_rope_theta: float | None = None  # RoPE of the sliding-window layers (None: the global tables)
    local_rope_scaling: dict[str, Any] | None = None
    multimodal: bool = False  # the text model of an image-text checkpoint (Gemma3ForConditionalGeneration, Qwen3.5's)
    # Gemma 3 / Mistral 3 / Qwen3.5 with images: the vision tower's config.json object (None: text only), the
    # image token that the processor repeats per image, and (Gemma 3) how many of them one image becomes.
    vision_config: dict[str, Any] | None = None
    image_token_id: int | None = None
    mm_tokens_per_image: int = 0
    # Mistral 3 / Pixtral-12B (LLaVA) with images (vision_config: the Pixtral tower): the projector's
    # settings, as transformers' Mistral3Config / LlavaConfig name them (server/models/mistral3_config.py)
    vision_projector: dict[str, Any] | None = None
    # Qwen3.5 with images: M-RoPE's rotary frequencies per row (temporal, height, width), interleaved
    mrope_section: tuple[int, ...] = ()
    # Mixture of experts (server/models/moe_config.py); num_experts 0: a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    norm_topk_prob: bool = False  # renormalize the top-k routing weights to sum to 1
    router_weights_fp32: bool = False  # Mixtral keeps routing weights in float32 (Qwen rounds them to the dtype)
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and it is not listed here
    # LFM2-MoE's router (server/models/lfm2.py): sigmoid scores, picks by score + a learned per-expert
    # bias, weights scaled after any renormalization ("softmax": the other families' router).
    router_scoring: str = "softmax"
    expert_bias: bool = False
    routed_scaling_factor: float = 1.0
    partial_rotary_factor: float = 1.0  # phi3 (Phi-4-mini: 0.75): RoPE rotates the first rotary_dim dims
    rope_interleaved: bool = False  # GLM: RoPE rotates pairs of neighbouring dims (GPT-J), not halves (neox)
    post_norms: bool = False  # GLM-4: RMSNorms of the attention and MLP outputs before the residual adds
    rope_fp32: bool = False  # Cohere: RoPE's products in float32, rounded once
    # Cohere / StableLM (server/models/layernorm_config.py): the norms are LayerNorms ("layernorm":
    # torch's, with a bias; "layernorm_fp32": Cohere's, in float32 without one; "rms": RMSNorm)
    norm_kind: str = "rms"
    parallel_residual: bool = False  # attention and MLP both read the layer's one normed input
    logit_scale: float = 1.0  # Cohere: logits multiplied by it
    # gpt-oss (server/models/gpt_oss_config.py):
    o_bias: bool = False  # o_proj has a bias
    rope_layers: tuple[bool, ...] | None = None  # SmolLM3: which layers rotate q and k (None: every layer)
    attn_sinks: bool = False  # a learned per-head logit joins each softmax's denominator (`self_attn.sinks`)
    swiglu_limit: float = 0.0  # gpt-oss experts clamp gate (above) and up (both sides) to this (0: not gpt-oss)
    # Hybrid models (server/models/lfm2_config.py): each layer's kind; only attention layers have a KV cache.
    layer_types: tuple[str, ...] | None = None
    conv_kernel: int = 0  # LFM2's short convolution width (conv_L_cache); its state keeps conv_kernel - 1 inputs
    conv_bias: bool = False
    # Qwen3.5's Gated DeltaNet layers (server/models/qwen3_5_config.py): (key heads, value heads), (key, value) head dims.
    linear_heads: tuple[int, int] = (0, 0)
    linear_head_dims: tuple[int, int] = (0, 0)
    # Mamba-2 hybrids (server/models/mamba2_config.py): the mixer's shapes (its layers keep a state),
    # the families' multipliers, whether attention rotates (Granite-4.0-H: no), Falcon-H1's MLP bias.
    mamba: Mamba2Config | None = None
    multipliers: Multipliers | None = None
    rope_enabled: bool = True
    mlp_bias: bool = False
    # Models whose layers cache keys of different shapes (Gemma 4: sliding layers 256 wide, full ones
    # global_head_dim with their own KV head count): each KV layer's (KV heads, head dim), in kv_layers'
    # order; None: every layer caches num_kv_heads x head_dim.
    kv_shapes: tuple[tuple[int, int], ...] | None = None

    @property
    def kv_layers(self) -> list[int]:
        """The layers that read and write the paged KV cache, in order (every layer but for hybrids)."""
        if self.layer_types is None:
            return list(range(self.num_layers))
        return [i for i, kind in enumerate(self.layer_types) if kind in ("full_attention", "sliding_attention")]

    def kv_cache_shapes(self) -> list[tuple[int, int]]:
        """Each KV layer's (KV heads, head dim), in kv_layers' order: the paged cache's per-layer shape."""
        if self.kv_shapes is not None:
            return list(self.kv_shapes)
        return [(self.num_kv_heads, self.head_dim)] * len(self.kv_layers)

    @property
    def has_state(self) -> bool:
        """Whether some layers keep a per-sequence state (a slot of the state cache); Falcon-H1's
        layers have attention and a Mamba-2 mixer both."""
        return len(self.kv_layers) < self.num_layers or self.mamba is not None

    @property
    def rotary_dim(self) -> int:
        """The dims of each head RoPE rotates; the rope tables are rotary_dim / 2 wide."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @property
    def attention_variants(self) -> list[tuple[int | None, float | None]]:
        """(sliding window, soft cap) of the model's attention layers, each once."""
        windows = set(self.layer_windows) if self.layer_windows is not None else {self.sliding_window}
        return sorted(((w, self.attn_softcap) for w in windows), key=lambda v: v[0] or 0)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        family = SUPPORTED_ARCHITECTURES.get(archs[0])
        if family is None:
            raise ValueError(
                f"architecture {archs[0]!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if archs[0] in PIXTRAL_ARCHITECTURES:  # the text model's fields, then the vision side's
            text = cls.from_dict(mistral3_text_config(cfg))
            return replace(text, multimodal=True, **mistral3_vision_fields(cfg))
        if family in GEMMA_FAMILIES:
            return cls(**gemma_fields(cfg, family, archs[0]))
        if family == "phi3":
            return cls(**phi3_fields(cfg))
        if family == "gpt_oss":
            return cls(**gpt_oss_fields(cfg))
        if family in ("glm", "glm4"):
            return cls(**glm_fields(cfg, family))
        if family == "exaone4":
            return cls(**exaone4_fields(cfg))
        if family in ("cohere", "stablelm"):
            return cls(**layernorm_fields(cfg, family))
        if family == "smollm3":  # Llama's fields, then its NoPE layers and their windows
            llama = cls.from_dict({**cfg, "architectures": ["LlamaForCausalLM"], "use_sliding_window": False})
            return replace(llama, **smollm3_fields(cfg, llama.num_layers))
        if family == "lfm2":
            return cls(**lfm2_fields(cfg))
        if family == "lfm2_moe":
            return cls(**lfm2_moe_fields(cfg))
        if family in ("qwen3_5", "qwen3_5_moe"):
            if archs[0].endswith("ForConditionalGeneration"):  # with its vision encoder (models/qwen3_5_vision.py)
                text_cfg = multimodal_text_config(cfg, archs[0])
                fields = qwen3_5_fields(text_cfg, family)
                return cls(**fields, multimodal=True, **qwen3_5_vision_fields(cfg, text_cfg, fields["hidden_size"]))
            return cls(**qwen3_5_fields(cfg, family))
        if family == "granitemoehybrid":
            return cls(**granite_hybrid_fields(cfg))
        if family == "falcon_h1":
            return cls(**falcon_h1_fields(cfg))
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        window = cfg.get("sliding_window") if family in ("mistral", "mixtral") or cfg.get("use_sliding_window") else None
        rope_theta, rope_scaling, max_positions = parse_rope(cfg, head_dim)
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,  # YaRN / dynamic serve past the config's value
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False))
            or (family == "qwen2_moe" and bool(cfg.get("qkv_bias", True))),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            sliding_window=window,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            attn_temperature=attn_temperature(cfg) if archs[0] == "Ministral3ForCausalLM" else None,
            **moe_fields(cfg, family),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no config.json: pass a Hugging Face model folder")
        cfg = cls.from_dict(json.loads(path.read_text()))
        if cfg.family in ("qwen3_5", "qwen3_5_moe") and cfg.vision_config is not None \
                and not qwen3_5_vision_on_disk(Path(folder)):
            # The language model's weights saved alone under the image-text config: its text model, served
            # under the image-text names (multimodal stays set), without the encoder that is not there.
            logger.warning("%s: config.json has a vision_config but the folder has no vision-encoder weights "
                           "(model.visual.*), so images are refused: the text model is served", folder)
            cfg = replace(cfg, vision_config=None, image_token_id=None, mrope_section=())
        return cfg
