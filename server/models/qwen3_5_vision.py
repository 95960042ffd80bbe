"""Qwen3.5 with images (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration): our
Qwen3.5 text model (Gated DeltaNet + gated attention, NF4 linears, multi-LoRA, a state slot per
sequence) with the checkpoint's own 16-bit vision encoder (transformers' module: patch embedding,
learned positions resampled to the image's grid, 2-D rotary blocks, a 2x2 patch merger) in the
prefill. Its embeddings replace the image placeholder tokens'; there are no DeepStack features.
Attention rotates by M-RoPE: three position rows (temporal, height, width, from
sloth_serve.engine.vision_inputs) whose rotary frequencies interleave t, h, w, t, h, w, ... over the
first 3 x mrope_section entries (the rest: temporal). Text has the same position in all three rows,
which is plain RoPE; so is every token after the prompt (its position plus the prompt's delta)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .layers import StepMetadata
from .per_adapter import AdapterStep
from .qwen3_5 import Qwen3_5ForCausalLM
from .tower_lora import tower_linears


def mrope_rows(half: int, section: tuple[int, ...]) -> torch.Tensor:
    """[half] which position row (0 temporal, 1 height, 2 width) rotates each frequency: height takes
    every third from 1 below 3 x section[1], width every third from 2 below 3 x section[2]."""
    rows = torch.zeros(half, dtype=torch.long)
    for row in (1, 2):
        rows[row : min(half, 3 * section[row]) : 3] = row
    return rows


class Qwen3_5VisionForCausalLM(Qwen3_5ForCausalLM):
    """Qwen3_5ForCausalLM plus `encode_images`; the forward pass splices the image embeddings that
    `meta.vision` (sloth_serve.models.vision_step.VisionStep) carries and rotates by its 3-row positions."""

    is_vision = True
    uses_mrope = True  # VisionInputs builds each step's three position rows

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        assert cfg.vision_config is not None and cfg.image_token_id is not None
        settings = {k: v for k, v in cfg.vision_config.items() if k != "model_type"}
        if cfg.family == "qwen3_5_moe":
            from transformers.models.qwen3_5_moe import Qwen3_5MoeVisionConfig as VisionConfig
            from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
                Qwen3_5MoeVisionModel as VisionModel,
            )
        else:
            from transformers.models.qwen3_5 import Qwen3_5VisionConfig as VisionConfig  # type: ignore[assignment]
            from transformers.models.qwen3_5.modeling_qwen3_5 import (  # type: ignore[assignment]
                Qwen3_5VisionModel as VisionModel,
            )
        vision_cfg = VisionConfig(**settings)
        vision_cfg._attn_implementation = "sdpa"
        self.visual = VisionModel(vision_cfg)
        self.visual.requires_grad_(False)
        self.image_token_id = cfg.image_token_id
        self.spatial_merge_size = int(vision_cfg.spatial_merge_size)  # type: ignore[arg-type]
        self.register_buffer("mrope_row", mrope_rows(cfg.rotary_dim // 2, cfg.mrope_section), persistent=False)

    def vision_lora_layers(self) -> dict[str, nn.Linear]:
        """The vision encoder's linears (its blocks and merger) an adapter may train per request."""
        return tower_linears(self, "visual")

    def post_load(self) -> None:
        """Buffers built on the meta device hold nothing: the encoder's rotary frequencies and the
        M-RoPE row of each frequency again."""
        rotary: Any = self.visual.rotary_pos_emb
        device = self.visual.pos_embed.weight.device
        inv_freq, _ = rotary.compute_axial_rope_parameters(rotary.config)
        rotary.inv_freq = inv_freq.to(device)
        rotary.original_inv_freq = inv_freq.clone().to(device)
        self.mrope_row = mrope_rows(self.config.rotary_dim // 2, self.config.mrope_section).to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None) -> torch.Tensor:
        h = self.embed(input_ids, adapters)
        vision = meta.vision
        if vision is None or vision.positions is None:
            return self.forward_embeds(h, positions, meta, kv_caches, adapters)
        if vision.rows is not None and vision.embeds is not None:
            h = h.index_copy(0, vision.rows, vision.embeds.to(h.dtype))
        # Each token's rotary angles: frequency j at the position of its row mrope_row[j]; the tables'
        # rows are then the tokens themselves.
        row: torch.Tensor = self.mrope_row  # type: ignore[assignment]
        pick = row.view(1, 1, -1).expand(1, vision.positions.shape[1], -1)
        tables: tuple[torch.Tensor, torch.Tensor] = (self.rope_cos, self.rope_sin)  # type: ignore[assignment]
        cos, sin = (table[vision.positions].gather(0, pick).squeeze(0) for table in tables)
        rows = torch.arange(h.shape[0], device=h.device)
        return self.forward_embeds(h, rows, meta, kv_caches, adapters, rope=(cos, sin))

    @torch.inference_mode()
    def encode_images(self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each image's embeddings [its placeholder tokens, hidden], all images in one encoder pass."""
        weight = self.visual.pos_embed.weight
        pixels = torch.cat([p.to(device=weight.device, dtype=weight.dtype) for p in pixel_values])
        grid = torch.tensor(grids, dtype=torch.long, device=weight.device)
        out: Any = self.visual(pixels, grid_thw=grid, return_dict=True)
        return list(out.pooler_output.split([self.num_image_tokens(g) for g in grids]))

    def num_image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.spatial_merge_size**2
