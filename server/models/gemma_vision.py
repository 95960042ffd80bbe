"""Gemma 3 with images: our Gemma 3 text model (NF4 linears, multi-LoRA, paged KV cache, CUDA graphs
for decode) with the checkpoint's own 16-bit SigLIP vision tower (transformers' module) and Gemma 3's
multi-modal projector in the prefill. Each image becomes mm_tokens_per_image embeddings that replace
its image soft tokens' (after the sqrt(hidden) scaling of the text embeddings, as transformers does),
and the tokens of one image attend to each other both ways (key ends, kernels/attention.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sloth_kernels.norm import gemma_rms_norm

from .config import ModelConfig
from .gemma import GemmaForCausalLM, GemmaRMSNorm
from .layers import StepMetadata
from .per_adapter import AdapterStep
from .tower_lora import tower_linears

# Checkpoint names of the vision side, as transformers 5 and earlier releases save them: the tower
# under vision_tower. or model.vision_tower., its modules under vision_model. or not.
_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
# Qwen3.5's vision encoder (with its merger), served natively beside its text model
_VISUAL_PREFIXES = ("model.visual.", "visual.")


def vision_module_name(name: str) -> str | None:
    """Our name for a checkpoint tensor of the vision tower or projector, or of Qwen3.5's vision
    encoder (None: not one of them)."""
    for prefix in _TOWER_PREFIXES:
        if name.startswith(prefix):
            return "vision_tower." + name[len(prefix) :].removeprefix("vision_model.")
    for prefix in _PROJECTOR_PREFIXES:
        if name.startswith(prefix):
            return "multi_modal_projector." + name[len(prefix) :]
    for prefix in _VISUAL_PREFIXES:
        if name.startswith(prefix):
            return "visual." + name[len(prefix) :]
    return None


class GemmaProjector(nn.Module):
    """Gemma 3's multi-modal projector: the tower's patch grid average-pooled to tokens_per_side²
    tokens, RMS-normed (1 + w), and projected to the text model's width."""

    def __init__(self, vision_hidden: int, text_hidden: int, eps: float, patches_per_side: int,
                 tokens_per_side: int) -> None:
        super().__init__()
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vision_hidden, text_hidden), requires_grad=False)
        self.mm_soft_emb_norm = GemmaRMSNorm(vision_hidden, eps)
        self.eps = eps
        self.patches_per_side = patches_per_side
        self.kernel = patches_per_side // tokens_per_side

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[images, patches, vision_hidden] -> [images, tokens, text_hidden]."""
        n, _, width = patches.shape
        side = self.patches_per_side
        grid = patches.transpose(1, 2).reshape(n, width, side, side)
        pooled = nn.functional.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        normed = gemma_rms_norm(pooled.contiguous(), self.mm_soft_emb_norm.scale, self.eps)
        return torch.matmul(normed, self.mm_input_projection_weight).to(patches.dtype)


class GemmaVisionForCausalLM(GemmaForCausalLM):
    """GemmaForCausalLM plus `encode_images`; the forward pass splices the image embeddings that
    `meta.vision` (sloth_serve.models.vision_step.VisionStep) carries for this step's image tokens."""

    is_vision = True
    bidirectional_images = True  # the scheduler keeps each image in one prefill chunk
    uses_mrope = False  # positions stay one per token (sloth_serve.engine.vision_inputs)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        from transformers import SiglipVisionConfig, SiglipVisionModel

        assert cfg.vision_config is not None and cfg.image_token_id is not None
        vision_cfg = SiglipVisionConfig(**{k: v for k, v in cfg.vision_config.items() if k != "model_type"})
        vision_cfg._attn_implementation = "sdpa"
        self.vision_tower = SiglipVisionModel(vision_cfg)
        self.vision_tower.requires_grad_(False)
        patches = int(vision_cfg.image_size) // int(vision_cfg.patch_size)  # type: ignore[arg-type]
        self.multi_modal_projector = GemmaProjector(vision_cfg.hidden_size, cfg.hidden_size, vision_cfg.layer_norm_eps,
                                                    patches, round(cfg.mm_tokens_per_image**0.5))
        self.image_token_id = cfg.image_token_id
        self.mm_tokens_per_image = cfg.mm_tokens_per_image

    def vision_lora_layers(self) -> dict[str, nn.Linear]:
        """The tower's linears an adapter may train per request (the projector has none: its
        projection is a bare weight, which PEFT does not wrap)."""
        return tower_linears(self, "vision_tower", "multi_modal_projector")

    def post_load(self) -> None:
        """Buffers built on the meta device hold nothing: the tower's patch position ids again."""
        super().post_load()
        embeddings: Any = self.vision_tower.embeddings
        device = embeddings.position_embedding.weight.device
        embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand((1, -1))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None) -> torch.Tensor:
        h = self.embed(input_ids, adapters)
        vision = meta.vision
        if vision is not None and vision.rows is not None and vision.embeds is not None:
            h = h.index_copy(0, vision.rows, vision.embeds.to(h.dtype))
        return self.forward_embeds(h, positions, meta, kv_caches, adapters)

    @torch.inference_mode()
    def encode_images(self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each image's embeddings [mm_tokens_per_image, hidden], all images in one tower pass."""
        weight = self.multi_modal_projector.mm_input_projection_weight
        pixels = torch.cat([p.to(device=weight.device, dtype=weight.dtype) for p in pixel_values])
        patches = self.vision_tower(pixel_values=pixels).last_hidden_state
        return list(self.multi_modal_projector(patches))
