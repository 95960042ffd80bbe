"""A tiny random Gemma3ForConditionalGeneration folder for the vision tests: a 4-layer Gemma 3 text
model (hidden 64, local layers with an 8-token window, shorter than an image) and a 2-layer SigLIP
tower on 32x32 images in 4-pixel patches, pooled to 16 image tokens; the demo tokenizer with Gemma's
turn and image tokens added, a Gemma-style chat template that renders image parts, and Gemma 3's
image processor and processor settings. The reference is transformers' own Gemma3Processor and
Gemma3ForConditionalGeneration (eager attention, image tokens bidirectional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

from sloth_serve.loader import DEMO_MODEL

IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
IMAGE_SEQ_LENGTH = 16
MAX_TOKENS = 8


def tokenizer_with_image_tokens() -> Any:
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL), extra_special_tokens=IMAGE_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": TURN_TOKENS}, replace_extra_special_tokens=False)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def make_gemma3_vl(folder: Path) -> tuple[Path, Any]:
    """The folder (weights, tokenizer, template, image processor, processor) and transformers' model."""
    tokenizer = tokenizer_with_image_tokens()
    boi, eoi, image = (tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[k]) for k in ("boi_token", "eoi_token",
                                                                                   "image_token"))
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                initializer_range=0.3, sliding_window=8, query_pre_attn_scalar=20, eos_token_id=1, pad_token_id=0,
                bos_token_id=2, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                             "full_attention"],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 20000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=4, vision_use_head=False, layer_norm_eps=1e-6)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=IMAGE_SEQ_LENGTH,
                          boi_token_index=boi, eoi_token_index=eoi, image_token_index=image,
                          tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms and biases away from their init, projection of a useful size
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            if "mm_input_projection" in name or "patch_embedding" in name or "position_embedding" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    processor(tokenizer).save_pretrained(folder)
    return folder, model


def image_processor() -> Gemma3ImageProcessorPil:
    return Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def processor(tokenizer: Any) -> Gemma3Processor:
    return Gemma3Processor(image_processor(), tokenizer, chat_template=TEMPLATE, image_seq_length=IMAGE_SEQ_LENGTH)


def chat_text(tokenizer: Any, num_images: int, question: str) -> str:
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return str(tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True))


def reference(tokenizer: Any, text: str, images: list[Any]) -> dict[str, torch.Tensor]:
    """What transformers' Gemma3Processor gives: input_ids, pixel_values, token_type_ids."""
    return dict(processor(tokenizer)(text=text, images=images or None, return_tensors="pt"))


def hf_greedy(model: Any, tokenizer: Any, text: str, images: list[Any], max_tokens: int = MAX_TOKENS) -> list[int]:
    """transformers' greedy tokens for the rendered text and its images, through its processor."""
    inputs = reference(tokenizer, text, images)
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1] :].tolist()  # type: ignore[no-any-return]
