"""A tiny random MllamaForConditionalGeneration (Llama 3.2 Vision) folder for the vision tests: a
4-layer text model whose layers 1 and 3 are gated cross-attention layers (gates set away from 0, so
images change the output), a vision encoder of 2 + 1 layers on 16x16 tiles in 4-pixel patches (up to
2 tiles an image), the demo tokenizer with <|image|> added past the text vocabulary (as Llama 3.2
Vision has it), and Mllama's image processor. The reference is transformers' own MllamaProcessor
and MllamaForConditionalGeneration (eager attention)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.mllama.processing_mllama import MllamaProcessor

from sloth_serve.loader import DEMO_MODEL

IMAGE_TOKEN = "<|image|>"
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MAX_TOKENS = 8


def make_mllama(folder: Path) -> tuple[Path, Any]:
    """The folder (weights, tokenizer, template, image processor) and transformers' model."""
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    tokenizer.bos_token = "<|im_start|>"  # MllamaProcessor puts one before a prompt that lacks it
    tokenizer.chat_template = TEMPLATE
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image == vocab  # past the text vocabulary: one of embed_tokens' 8 extra rows
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, cross_attention_layers=[1, 3],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=2, pad_token_id=0,
                bos_token_id=1, initializer_range=0.3)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=48,
                  vision_output_dim=64, image_size=16, patch_size=4, max_num_tiles=2,
                  intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
                  initializer_range=0.3)
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=image)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # gates open (transformers initializes them at 0: images would change nothing)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            if "gate" in name:
                p.fill_(1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder, model


def image_processor() -> MllamaImageProcessorPil:
    return MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=2)


def processor(tokenizer: Any) -> MllamaProcessor:
    return MllamaProcessor(image_processor(), tokenizer, chat_template=TEMPLATE)


def chat_text(tokenizer: Any, parts: list[str]) -> str:
    """A user message of parts: IMAGE_TOKEN for an image, any other string for text."""
    content = [{"type": "image"} if p == IMAGE_TOKEN else {"type": "text", "text": p} for p in parts]
    return str(tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True))


def hf_greedy(model: Any, tokenizer: Any, text: str, images: list[Image.Image],
              max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[int]]:
    """transformers' prompt ids and greedy tokens for the text (its images as MllamaProcessor takes them)."""
    inputs = processor(tokenizer)(text=text, images=[images] if images else None, return_tensors="pt",
                                  add_special_tokens=False)
    ids = inputs["input_ids"]
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()
