"""Tiny random Qwen2.5-VL folders for the vision tests: a 2-layer language model (hidden 64) and a
2-block vision encoder (4-pixel patches, 2x2 merge), the demo tokenizer with Qwen's three vision
tokens added, a ChatML template that renders image parts, and a small image processor config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from sloth_serve.loader import DEMO_MODEL

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_TOKENS = 8


def make_qwen2_5_vl(folder: Path, qwen2: bool = False, qwen3: bool = False, moe: bool = False) -> tuple[Path, Any]:
    """The folder (weights, tokenizer, template, image processor) and transformers' model (eager).
    `qwen2`: a Qwen2-VL (no windowed vision attention, its own vision config fields) instead;
    `qwen3`: a Qwen3-VL (q/k norms, interleaved M-RoPE, learned vision positions, DeepStack features
    from both encoder blocks added after the first two decoder layers); with `moe`, Qwen3-VL-MoE (4
    experts, 2 a token, in every layer)."""
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = TEMPLATE
    start, pad, end = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    vision: dict[str, Any] = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4,
                                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=64,
                                  fullatt_block_indexes=[1], initializer_range=0.3)
    if qwen2:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, initializer_range=0.3)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text: dict[str, Any] = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                rope_parameters=rope, eos_token_id=2, pad_token_id=0, bos_token_id=1,
                                initializer_range=0.3)
    config_class: Any = Qwen2VLConfig if qwen2 else Qwen2_5_VLConfig
    if qwen3:
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 1], initializer_range=0.3)
        text.update(head_dim=16, rope_parameters={**rope, "mrope_interleaved": True})
        config_class = Qwen3VLConfig
        if moe:
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
            config_class = Qwen3VLMoeConfig
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=pad, vision_start_token_id=start, vision_end_token_id=end, video_token_id=len(tokenizer) + 7,
        eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )
    torch.manual_seed(0)
    model_class: Any = Qwen2VLForConditionalGeneration if qwen2 else Qwen2_5_VLForConditionalGeneration
    if qwen3:
        model_class = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    model = model_class._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random biases and norms so that those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(folder)
    return folder, model


def image_processor(folder: Path | None = None) -> Qwen2VLImageProcessorPil:
    """Images resized to 64-1024 pixels' area in 8-pixel steps: 4 to 16 placeholder tokens each."""
    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8,
                                         max_pixels=32 * 32)
    if folder is not None:
        processor.save_pretrained(folder)
    return processor


def random_image(seed: int, width: int = 30, height: int = 20) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def hf_greedy(model: Any, token_ids: list[int], images: list[Image.Image], max_tokens: int = MAX_TOKENS) -> list[int]:
    """transformers' greedy tokens for a prompt whose placeholders are already expanded."""
    ids = torch.tensor([token_ids])
    kwargs: dict[str, Any] = {}
    if images:
        batch = image_processor()(images=images, return_tensors="pt")
        kwargs = dict(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                      mm_token_type_ids=(ids == model.config.image_token_id).int())
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, len(token_ids):].tolist()  # type: ignore[no-any-return]


def reference_prompt(tokenizer: Any, question: str, images: list[Image.Image]) -> list[int]:
    """The prompt as Qwen2.5-VL's processor builds it: the template rendered with one image part per
    image, and each image's placeholder repeated once per merged 2x2 patch of its resized grid."""
    content: list[dict[str, str]] = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    grids = image_processor()(images=images, return_tensors="pt")["image_grid_thw"].tolist() if images else []
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for t, h, w in grids:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // 4), 1)
    ids = tokenizer.encode(text.replace("<|placeholder|>", "<|image_pad|>"), add_special_tokens=False)
    assert ids.count(pad) == sum(t * h * w // 4 for t, h, w in grids)
    return list(ids)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def ask(question: str, *images: Image.Image) -> list[dict[str, Any]]:
    """A chat of one user message: the images as base64 PNG image_url parts, then the question."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def write_adapter(hf: Any, folder: Path, target: str) -> Path:
    """PEFT's adapter on the modules matching `target`, random lora_B; the base left as it was."""
    torch.manual_seed(3)
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=target))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(folder))
    return folder
