"""Mistral Small 3.1 / 3.2 with images (Mistral3ForConditionalGeneration): our Mistral text model (NF4
linears, multi-LoRA, paged KV cache, CUDA graphs for decode) with the checkpoint's own 16-bit Pixtral
vision tower and Mistral 3's projector (RMSNorm, a learned merge of each 2x2 patch block, two linears)
in the prefill, transformers' modules as they are; Pixtral-12B (LlavaForConditionalGeneration with a
Pixtral tower) is the same with LLaVA's projector (two linears) and no merge. An image is rows of
[IMG] tokens, each row ending in [IMG_BREAK] and the last in [IMG_END] instead; the projector's
embeddings replace the [IMG] tokens' and the break and end tokens keep their own embeddings.
Attention stays causal, one position a token."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .layers import StepMetadata
from .llama import LlamaForCausalLM
from .mistral3_config import LLAVA_ARCHITECTURE
from .per_adapter import AdapterStep
from .tower_lora import tower_linears


class Mistral3VisionForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM plus `encode_images`; the forward pass splices the image embeddings that
    `meta.vision` (sloth_serve.engine.vision_inputs.VisionStep) carries for this step's [IMG] tokens."""

    is_vision = True
    uses_mrope = False  # positions stay one per token (sloth_serve.engine.vision_inputs)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        from transformers import PixtralVisionConfig, PixtralVisionModel

        assert cfg.vision_config is not None and cfg.vision_projector is not None and cfg.image_token_id is not None
        vision_cfg = PixtralVisionConfig(**{k: v for k, v in cfg.vision_config.items() if k != "model_type"})
        vision_cfg._attn_implementation = "sdpa"
        self.vision_tower = PixtralVisionModel(vision_cfg)
        self.vision_tower.requires_grad_(False)
        settings = dict(cfg.vision_projector)
        self.llava = settings.pop("architecture") == LLAVA_ARCHITECTURE
        self.merge = int(settings["spatial_merge_size"])
        self.feature_layer: int | list[int] = settings["vision_feature_layer"]
        self.multi_modal_projector = _projector(vision_cfg, cfg, settings, self.llava)
        self.multi_modal_projector.requires_grad_(False)
        self.image_token_id = cfg.image_token_id
        self.patch_size = int(vision_cfg.patch_size)  # type: ignore[arg-type]

    def vision_lora_layers(self) -> dict[str, nn.Linear]:
        """The Pixtral tower's and the projector's linears an adapter may train per request."""
        return tower_linears(self, "vision_tower", "multi_modal_projector")

    def post_load(self) -> None:
        """Buffers built on the meta device hold nothing: the tower's rotary frequencies again."""
        rotary: Any = self.vision_tower.patch_positional_embedding
        device = self.vision_tower.patch_conv.weight.device
        inv_freq, _ = rotary.compute_axial_rope_parameters(rotary.config)
        rotary.inv_freq = inv_freq.to(device)
        rotary.original_inv_freq = inv_freq.clone().to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None) -> torch.Tensor:
        h = self.embed(input_ids, adapters)
        vision = meta.vision
        if vision is not None and vision.rows is not None and vision.embeds is not None:
            # An image's rows span its break and end tokens too: only its [IMG] tokens take the encoder's.
            here = h.index_select(0, vision.rows)
            is_image = (input_ids.index_select(0, vision.rows) == self.image_token_id).unsqueeze(-1)
            h = h.index_copy(0, vision.rows, torch.where(is_image, vision.embeds.to(h.dtype), here))
        return self.forward_embeds(h, positions, meta, kv_caches, adapters)

    @torch.inference_mode()
    def encode_images(self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each image's embeddings, one row per token of its span (rows of [IMG] then [IMG_BREAK], the
        last ending in [IMG_END]; the break and end rows are zeros, never spliced), all images in one
        tower pass (padded to the largest, as Pixtral's image processor batches them)."""
        weight = self.vision_tower.patch_conv.weight
        p = self.patch_size
        sizes = [(h * p, w * p) for _, h, w in grids]
        pixels = weight.new_zeros(len(sizes), 3, max(s[0] for s in sizes), max(s[1] for s in sizes))
        for i, (image, (height, width)) in enumerate(zip(pixel_values, sizes, strict=True)):
            pixels[i, :, :height, :width] = image.reshape(3, height, width).to(device=weight.device, dtype=weight.dtype)
        out: Any = self.vision_tower(pixels, image_sizes=sizes, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else self.feature_layer
        features = torch.cat([out.hidden_states[i] for i in layers], dim=-1).squeeze(0)
        merged = self.multi_modal_projector(features) if self.llava else self.multi_modal_projector(features, sizes)
        spans = []
        for image, (_, h, w) in zip(merged.split([h * w // self.merge**2 for _, h, w in grids]), grids, strict=True):
            rows, cols = h // self.merge, w // self.merge
            span = image.new_zeros(rows, cols + 1, image.shape[-1])
            span[:, :cols] = image.view(rows, cols, -1)
            spans.append(span.flatten(0, 1))
        return spans

    def image_token_layout(self, grid: tuple[int, int, int]) -> list[bool]:
        """Which tokens of an image's span are [IMG] tokens (the others close a row): its merged
        rows of patches, each followed by one break (or, for the last, the end) token."""
        cols = grid[2] // self.merge
        return ([True] * cols + [False]) * (grid[1] // self.merge)


def _projector(vision_cfg: Any, cfg: ModelConfig, settings: dict[str, Any], llava: bool) -> nn.Module:
    """transformers' projector of the checkpoint's architecture: Mistral 3's (RMSNorm, patch merger,
    two linears) or LLaVA's (two linears), built from the config fields it reads."""
    text = dict(model_type="mistral", hidden_size=cfg.hidden_size, rms_norm_eps=cfg.rms_norm_eps)
    if llava:
        from transformers import LlavaConfig
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        settings = {k: v for k, v in settings.items() if k != "spatial_merge_size"}
        return LlavaMultiModalProjector(LlavaConfig(vision_config=vision_cfg.to_dict(), text_config=text,
                                                    vision_feature_select_strategy="full", **settings))
    from transformers import Mistral3Config
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    return Mistral3MultiModalProjector(Mistral3Config(vision_config=vision_cfg.to_dict(), text_config=text, **settings))
