"""Gemma 3's prompts with images: the token ids our processor makes from the rendered prompt's ids
equal transformers' Gemma3Processor's from its text, whatever sits beside the images (turn markers,
text ending in newlines or spaces, two images in a row, images in several turns), and each image's
inputs point at its image tokens. No model: the demo tokenizer with Gemma's tokens added."""

from __future__ import annotations

from typing import Any

import pytest
from gemma3_vision_models import (
    IMAGE_SEQ_LENGTH,
    IMAGE_TOKENS,
    image_processor,
    reference,
    tokenizer_with_image_tokens,
)
from vision_models import random_image

from sloth_serve.vision_gemma3 import Gemma3VisionProcessor
from sloth_serve.vision_processor import ImageError, ImageLimits


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tokenizer_with_image_tokens()


def processor(tokenizer: Any, max_images: int = 8) -> Gemma3VisionProcessor:
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in IMAGE_TOKENS.items()}
    cfg = {"boi_token_index": ids["boi_token"], "eoi_token_index": ids["eoi_token"],
           "image_token_index": ids["image_token"], "mm_tokens_per_image": IMAGE_SEQ_LENGTH}
    return Gemma3VisionProcessor(image_processor(), tokenizer, cfg, ImageLimits(max_images=max_images))


BOI = "<start_of_image>"
TEXTS = [
    f"<start_of_turn>user\n{BOI}What is it?<end_of_turn>\n<start_of_turn>model\n",
    f"<start_of_turn>user\n{BOI}{BOI}Compare.<end_of_turn>\n<start_of_turn>model\n",
    f"<start_of_turn>user\nLook at this:\n{BOI}\nand this one {BOI} then answer.<end_of_turn>\n",
    f"<start_of_turn>user\nFirst {BOI}<end_of_turn>\n<start_of_turn>model\nOk.<end_of_turn>\n"
    f"<start_of_turn>user\n\n\n{BOI}\n\nSecond?<end_of_turn>\n<start_of_turn>model\n",
    f"{BOI}",
    "text only, no image at all\n\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_ids_equal_transformers_processor(tokenizer: Any, text: str) -> None:
    images = [random_image(i, 20 + i, 30) for i in range(text.count(BOI))]
    ids, mm = processor(tokenizer).expand(tokenizer.encode(text), images)
    assert ids == reference(tokenizer, text, images)["input_ids"][0].tolist()
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"])
    mm.check_prompt(ids, image_token)
    assert [img.num_tokens for img in mm.images] == [IMAGE_SEQ_LENGTH] * len(images)
    assert ids.count(image_token) == IMAGE_SEQ_LENGTH * len(images)


def test_placeholder_and_image_counts_must_agree(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXTS[0])
    with pytest.raises(ValueError, match="1 image placeholder"):
        processor(tokenizer).expand(ids, [random_image(1), random_image(2)])
    with pytest.raises(ImageError, match="at most 1"):
        processor(tokenizer, max_images=1).expand(tokenizer.encode(TEXTS[1]), [random_image(1), random_image(2)])
