"""A tiny random Mistral3ForConditionalGeneration folder for the vision tests: a 2-layer Mistral text
model (hidden 64) and a 2-layer Pixtral tower on 4-pixel patches merged 2x2, images resized to at most
32 pixels a side (up to 4 rows of 4 image tokens); the demo tokenizer with Mistral's [IMG],
[IMG_BREAK] and [IMG_END] tokens added, a template rendering each image part as [IMG], and Pixtral's
image processor settings. The reference prompt follows PixtralProcessor (which needs torchvision,
absent here): each [IMG] of the rendered text becomes its image's rows, tokenized with the text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
)
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from sloth_serve.loader import DEMO_MODEL

IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}[IMG]"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% endif %}{% endfor %}"
)
PATCH, MERGE, LONGEST_EDGE = 4, 2, 32
MAX_TOKENS = 8


def make_mistral3(folder: Path, llava: bool = False, ministral3: bool = False) -> tuple[Path, Any]:
    """The folder (weights, tokenizer, template, image processor) and transformers' model (eager).
    `llava`: a Pixtral-12B-style LlavaForConditionalGeneration instead (no patch merge, LLaVA's
    projector with biases). `ministral3`: a Ministral 3 text model (YaRN from 16 positions, queries
    scaled up every 16 positions), so that prompts with images run past where the scale grows."""
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    tokenizer.add_special_tokens({"additional_special_tokens": [*IMAGE_TOKENS, "[INST]", "[/INST]"]})
    tokenizer.chat_template = TEMPLATE
    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=512, sliding_window=None, rms_norm_eps=1e-5, initializer_range=0.3,
                eos_token_id=2, pad_token_id=0, bos_token_id=1, tie_word_embeddings=False)
    if ministral3:
        text.update(model_type="ministral3", max_position_embeddings=256, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5})
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, patch_size=PATCH, image_size=LONGEST_EDGE, initializer_range=0.3)
    image_token = tokenizer.convert_tokens_to_ids("[IMG]")
    config: Any = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=MERGE,
                                 image_token_index=image_token, tie_word_embeddings=False, projector_hidden_act="gelu")
    model_class: Any = Mistral3ForConditionalGeneration
    if llava:
        config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token,
                             vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
        model_class = LlavaForConditionalGeneration
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms and biases away from their init so that those code paths matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
            if "patch_conv" in name or "merging_layer" in name or "linear_" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder, model


def image_processor() -> PixtralImageProcessorPil:
    return PixtralImageProcessorPil(size={"longest_edge": LONGEST_EDGE}, patch_size={"height": PATCH, "width": PATCH})


def pixels(images: list[Any], merge: int = MERGE) -> dict[str, torch.Tensor]:
    """pixel_values (padded to the largest) and image_sizes, as PixtralProcessor asks its image
    processor for them: sides in multiples of patch_size * spatial_merge_size."""
    return dict(image_processor()(images=images, return_tensors="pt", patch_size=PATCH * merge))


def chat_text(tokenizer: Any, num_images: int, question: str) -> str:
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return str(tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False))


def reference_prompt(tokenizer: Any, text: str, images: list[Any], merge: int = MERGE) -> list[int]:
    """PixtralProcessor's input_ids: each [IMG] in the text replaced by rows of [IMG] tokens (one per
    merged patch) each ending in [IMG_BREAK], the very last one [IMG_END], then tokenized."""
    sizes = pixels(images, merge)["image_sizes"].tolist() if images else []
    side = PATCH * merge
    parts = text.split("[IMG]")
    assert len(parts) == len(sizes) + 1
    expanded = parts[0]
    for (height, width), after in zip(sizes, parts[1:], strict=True):
        rows = "".join(["[IMG]" * (width // side) + "[IMG_BREAK]"] * (height // side))
        expanded += rows.removesuffix("[IMG_BREAK]") + "[IMG_END]" + after
    return list(tokenizer.encode(expanded, add_special_tokens=False))


def hf_greedy(model: Any, token_ids: list[int], images: list[Any], max_tokens: int = MAX_TOKENS,
              merge: int = MERGE) -> list[int]:
    """transformers' greedy tokens for a prompt whose placeholders are already expanded."""
    kwargs: dict[str, Any] = pixels(images, merge) if images else {}
    out = model.generate(torch.tensor([token_ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0, **kwargs)
    return out[0, len(token_ids) :].tolist()  # type: ignore[no-any-return]
