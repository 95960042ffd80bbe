"""Image-text models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE): the language model runs on the generic path
(paged KV cache, our NF4 linears and multi-LoRA), the checkpoint's own 16-bit vision encoder runs in
the prefill, and its embeddings replace the image placeholder tokens' before the first layer.
Positions are M-RoPE's three rows (temporal, height, width), computed per sequence by
sloth_serve.engine.vision_inputs. Qwen3-VL also adds "DeepStack" features (from intermediate encoder
layers) to the image tokens' hidden states after each of its first decoder layers: an image's
embeddings are then its main features and those, side by side in one row per placeholder token, so
that the encoder cache and a prompt chunked across an image slice them together."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .generic import GenericCausalLM
from .generic_linear import GenericLinear, SliceGroup
from .generic_step import GenericStep
from .layers import StepMetadata
from .per_adapter import AdapterStep
from .tower_lora import tower_linears


class VisionCausalLM(GenericCausalLM):
    """GenericCausalLM plus `encode_images` and image embeddings / 3-D positions read from
    `meta.vision` (a sloth_serve.models.vision_step.VisionStep) in the forward pass."""

    is_vision = True
    # Decode steps replay CUDA graphs (prompt steps run eagerly: their three position rows and image
    # embeddings change per step): a token after the prompt sits at the same position in all three
    # rows, its index plus the prompt's delta, so the graph's one position a token is all it needs
    # (VisionInputs.plain_position), and the text model's decode step reads no tensor on the host.
    # Eager, every step of a 7B launched its transformers modules' kernels one by one: ~100 ms.
    supports_cuda_graphs = True

    def __init__(self, hf: PreTrainedModel, step: GenericStep, lora: dict[str, GenericLinear | SliceGroup]) -> None:
        super().__init__(hf, step, lora)
        self.visual = self.backbone.visual
        self.text = self.backbone.language_model
        cfg = hf.config
        self.image_token_id = int(cfg.image_token_id)
        self.spatial_merge_size = int(cfg.vision_config.spatial_merge_size)
        # Qwen3-VL: how many decoder layers receive DeepStack features (0 for Qwen2-VL / Qwen2.5-VL)
        self.num_deepstack = len(getattr(cfg.vision_config, "deepstack_visual_indexes", None) or ())
        self.hidden_size = int(self.text.config.hidden_size)

    def vision_lora_layers(self) -> dict[str, nn.Linear]:
        """The vision encoder's linears (its blocks and merger) an adapter may train per request."""
        return tower_linears(self, "visual")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None) -> torch.Tensor:
        if adapters is not None:
            raise ValueError("adapters with their own embed_tokens / lm_head / norms are served on native families only")
        embeds = self.text.embed_tokens(input_ids)
        vision = meta.vision
        extra: dict[str, Any] = {}
        if vision is not None and vision.rows is not None and vision.embeds is not None:
            images = vision.embeds.to(embeds.dtype)
            h = self.hidden_size
            embeds = embeds.index_copy(0, vision.rows, images[:, :h])
            if self.num_deepstack:
                # transformers adds layer i's features to the masked rows in ascending row order
                order = torch.argsort(vision.rows)
                mask = torch.zeros(1, input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                mask[0, vision.rows] = True
                extra = dict(visual_pos_masks=mask, deepstack_visual_embeds=[
                    images[order, h * (i + 1) : h * (i + 2)] for i in range(self.num_deepstack)])
        # Text-only tokens have the same position in all three rows.
        rows = vision.positions if vision is not None and vision.positions is not None else (
            positions.unsqueeze(0).expand(3, -1))
        step = self.step
        step.meta, step.kv_caches = meta, kv_caches
        step.layers_called.clear()
        try:
            out = self.text(inputs_embeds=embeds.unsqueeze(0), position_ids=rows.unsqueeze(1), use_cache=False, **extra)
        finally:
            step.meta, step.kv_caches = None, None
        return out.last_hidden_state[0]  # type: ignore[no-any-return]

    @torch.inference_mode()
    def encode_images(self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each image's embeddings [its placeholder tokens, hidden * (1 + num_deepstack)], all images in
        one encoder pass."""
        device = self.text.embed_tokens.weight.device
        dtype = next(self.visual.parameters()).dtype
        pixels = torch.cat([p.to(device=device, dtype=dtype) for p in pixel_values])
        grid = torch.tensor(grids, dtype=torch.long, device=device)
        out: Any = self.backbone.get_image_features(pixels, grid)
        main = list(out.pooler_output)
        if not self.num_deepstack:
            return main
        sizes = [m.shape[0] for m in main]
        layers = [torch.split(f, sizes) for f in out.deepstack_features]  # per layer, per image
        return [torch.cat([m, *(layer[i] for layer in layers)], dim=-1) for i, m in enumerate(main)]

    def num_image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.spatial_merge_size**2
