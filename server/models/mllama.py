"""Llama 3.2 Vision (MllamaForConditionalGeneration) on the generic path: the text model's self-
attention layers go to the paged KV cache (their cache index counts self-attention layers only), and
its gated cross-attention layers attend, each sequence's rows densely to its own images' states
(sloth_serve.engine.cross_inputs): keys and values projected once per sequence, at its first step,
and kept with it. The vision encoder and projector run in 16-bit, transformers' modules as they are."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from transformers import PreTrainedModel

from .generic import GenericCausalLM
from .generic_linear import GenericLinear, SliceGroup
from .generic_step import GenericStep
from .layers import StepMetadata
from .per_adapter import AdapterStep
from .vision_step import CrossKV, CrossStep


class _CrossKV:
    """What MllamaTextCrossAttention reads cached keys and values from (a transformers Cache's
    interface): each sequence's image keys and values, computed by MllamaCausalLM. They reach our
    attention function (sloth_serve.models.generic.cross_attention_forward) as they are: one tensor
    per sequence, never concatenated, since each sequence attends to its own only."""

    def __init__(self, layer: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.layers = {layer: self}
        self.keys, self.values = keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return sum(int(k.shape[1]) for k in self.keys)


class MllamaCausalLM(GenericCausalLM):
    """GenericCausalLM over MllamaModel: forward runs the text model's layers itself, cross-attention
    layers only on the rows of sequences with images (meta.vision.cross)."""

    is_vision = True
    uses_mrope = False  # one position a token
    cross_attention_images = True  # sloth_serve.engine.vision_inputs builds a CrossStep

    def __init__(self, hf: PreTrainedModel, step: GenericStep, lora: dict[str, GenericLinear | SliceGroup]) -> None:
        super().__init__(hf, step, lora)
        self.text = self.backbone.language_model
        self.vision_model = self.backbone.vision_model
        self.projector = self.backbone.multi_modal_projector
        cfg = hf.config
        self.image_token_id = int(cfg.image_token_index)
        self.cross_layers = frozenset(int(i) for i in self.text.config.cross_attention_layers)
        self.num_patches = int(self.vision_model.num_patches)
        cache_index = 0
        for idx, layer in enumerate(self.text.layers):
            if idx in self.cross_layers:
                layer.cross_attn.sloth_dense = True  # sloth_serve.models.generic.cross_attention_forward
            else:  # the paged KV cache holds self-attention layers only
                layer.self_attn.layer_idx = cache_index
                cache_index += 1

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], adapters: AdapterStep | None = None) -> torch.Tensor:
        if adapters is not None:
            raise ValueError("adapters with their own embed_tokens / lm_head / norms are served on native families only")
        cross = meta.vision.cross if meta.vision is not None else None
        step = self.step
        step.meta, step.kv_caches = meta, kv_caches
        step.layers_called.clear()
        try:
            h = self.text.embed_tokens(input_ids).unsqueeze(0)
            position_ids = positions.unsqueeze(0)
            rope = self.text.rotary_emb(h, position_ids=position_ids)
            for idx, layer in enumerate(self.text.layers):
                if idx not in self.cross_layers:
                    h = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=rope,
                              use_cache=False)
                elif cross is not None:
                    h = h.index_copy(1, cross.rows, self._cross_layer(idx, layer, h[:, cross.rows], cross, meta))
            h = self.text.norm(h)
        finally:
            step.meta, step.kv_caches = None, None
        return h[0]

    def _cross_layer(self, idx: int, layer: Any, h: torch.Tensor, cross: CrossStep, meta: StepMetadata) -> torch.Tensor:
        """The gated cross-attention layer on its rows h [1, R, hidden], over the keys and values of
        their sequences' images; LoRA rows follow each row's sequence."""
        keys, values = zip(*(self._cross_kv(idx, layer.cross_attn, kv, cross.owners[s : s + 1], meta)
                             for s, kv in enumerate(cross.kv)), strict=True)
        masks = [torch.zeros(a.shape, dtype=h.dtype, device=h.device).masked_fill_(~a, torch.finfo(h.dtype).min)
                 for a in cross.allowed]
        row_mask = cross.row_sees_image.to(h.dtype).view(1, 1, -1, 1)
        slots = meta.lora_slots
        self.step.meta = replace(meta, lora_slots=None if slots is None else slots[cross.rows])
        try:
            past = _CrossKV(idx, list(keys), list(values))
            out = layer(h, cross_attention_states=None, cross_attention_mask=masks,
                        attention_mask=None, full_text_row_masked_out_mask=row_mask,
                        past_key_values=past, use_cache=False)
        finally:
            self.step.meta = meta
        return out  # type: ignore[no-any-return]

    def _cross_kv(self, idx: int, attn: Any, kv: CrossKV, owner: torch.Tensor,
                  meta: StepMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's keys and values [kv heads, N, head dim] for cross-attention layer idx:
        projected from its images' states (k/v LoRA of its adapter, the flat-batch row `owner`'s,
        then the k norm) the first time, kept in `kv` after; the states go once every layer has its."""
        known = kv.layers.get(idx)
        if known is not None:
            return known
        assert kv.states is not None, "the states go only once every cross-attention layer has its keys and values"
        dtype = self.text.embed_tokens.weight.dtype
        states = kv.states.to(dtype).unsqueeze(0)
        slots = meta.lora_slots
        self.step.meta = replace(meta, lora_slots=None if slots is None else slots[owner].expand(states.shape[1]))
        try:
            shape = (1, -1, attn.num_key_value_heads, attn.head_dim)
            keys = attn.k_norm(attn.k_proj(states).view(shape).transpose(1, 2))
            values = attn.v_proj(states).view(shape).transpose(1, 2)
        finally:
            self.step.meta = meta
        kv.layers[idx] = known = (keys[0], values[0])
        if len(kv.layers) == len(self.cross_layers):
            kv.states = None
        return known

    def cross_kv_bytes_per_image(self, dtype: torch.dtype) -> int:
        """What one image's keys and values take in every cross-attention layer (all of its padded
        tiles' states: sloth_serve.engine.cross_kv counts them against its budget)."""
        attn = self.text.layers[min(self.cross_layers)].cross_attn
        states = int(self.vision_model.max_num_tiles) * self.num_patches
        size = torch.empty((), dtype=dtype).element_size()
        return len(self.cross_layers) * 2 * int(attn.num_key_value_heads) * int(attn.head_dim) * states * size

    @torch.inference_mode()
    def encode_images(self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each image's states [max tiles * patches, hidden] (its padding tiles' too: rows that see
        no image attend to them, as in transformers), all images in one encoder pass. An image's
        grid is (1, aspect ratio id, tiles) (sloth_serve.vision_mllama)."""
        device = self.text.embed_tokens.weight.device
        dtype = next(self.vision_model.parameters()).dtype
        pixels = torch.stack([p.to(device=device, dtype=dtype) for p in pixel_values]).unsqueeze(0)
        max_tiles = pixels.shape[2]
        ratio_ids = torch.tensor([[g[1] for g in grids]], device=device)
        ratio_mask = (torch.arange(max_tiles, device=device) < torch.tensor([g[2] for g in grids], device=device)[:, None])
        out = self.vision_model(pixel_values=pixels, aspect_ratio_ids=ratio_ids,
                                aspect_ratio_mask=ratio_mask.long().unsqueeze(0)).last_hidden_state
        states = self.projector(out)  # [1, images, tiles, patches, hidden]
        return list(states[0].flatten(1, 2).unbind(0))

    def valid_state_rows(self, grid: tuple[int, int, int]) -> int:
        """States of an image's real tiles (the first of its rows), from its grid."""
        return grid[2] * self.num_patches
