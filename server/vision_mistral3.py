"""Mistral 3's (and Pixtral-12B's) images to engine inputs, as their Hugging Face processor
(PixtralProcessor) makes them: each image resized so that its longest edge is at most the image
processor's longest_edge and each side a multiple of patch_size * spatial_merge_size (Pixtral's image
processor), and each [IMG] in the rendered prompt becoming, per row of merged patches, that many
[IMG] tokens and an [IMG_BREAK], the last row's break an [IMG_END]. The placeholders are special tokens, so the text around them is
tokenized alike before and after the expansion."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .engine.mm_inputs import ImageInput, MultiModalInputs
from .models.mistral3_config import LLAVA_ARCHITECTURE
from .vision_processor import ImageError, ImageLimits, VisionProcessor

logger = logging.getLogger(__name__)

TOKENS = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}


class Mistral3VisionProcessor(VisionProcessor):
    """Pixtral's image processor and Mistral 3's image tokens; `expand` as VisionProcessor's."""

    def __init__(self, image_processor: Any, token_ids: dict[str, int], patch_size: int, merge_size: int,
                 limits: ImageLimits) -> None:
        self.image_processor = image_processor
        self.limits = limits
        self.image_token_id = token_ids["image_token"]
        self.break_token_id = token_ids["image_break_token"]
        self.end_token_id = token_ids["image_end_token"]
        self.image_token = TOKENS["image_token"]
        self.patch_size = patch_size
        self.merge_size = merge_size

    @classmethod
    def from_mistral3_folder(cls, folder: Path, cfg: dict[str, Any], limits: ImageLimits) -> Mistral3VisionProcessor | None:
        """The folder's image processor (preprocessor_config.json) and the image tokens of its tokenizer
        (names from processor_config.json, else Pixtral's); the patch and merge sizes the model's
        config.json gives. None (text only, with a warning) when the tokenizer lacks the tokens."""
        from transformers import AutoTokenizer
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        patch = int(cfg["vision_config"].get("patch_size", 16))
        llava = (cfg.get("architectures") or [None])[0] == LLAVA_ARCHITECTURE  # Pixtral-12B: no merge
        merge = 1 if llava else int(cfg.get("spatial_merge_size", 2))
        saved = folder / "processor_config.json"
        settings = json.loads(saved.read_text()) if saved.is_file() else {}
        for key, value in (("patch_size", patch), ("spatial_merge_size", merge)):
            if key in settings and int(settings[key]) != value:
                raise ValueError(f"{saved} has {key} {settings[key]} but config.json says {value}: the vision "
                                 "tower and projector use the latter")
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        vocab = tokenizer.get_vocab()
        names = {key: str(settings.get(key) or token) for key, token in TOKENS.items()}
        missing = [name for name in names.values() if name not in vocab]
        if missing:
            logger.warning("%s: the tokenizer has no %s token: images cannot be placed in prompts, so the model is "
                           "served for text only", folder, " / ".join(missing))
            return None
        ids = {key: int(vocab[name]) for key, name in names.items()}
        image_token = int(cfg.get("image_token_id", cfg.get("image_token_index", 32000 if llava else 10)))
        if ids["image_token"] != image_token:
            raise ValueError(f"{folder}: the tokenizer's {names['image_token']} is token {ids['image_token']} but "
                             f"config.json image_token_index is {image_token}")
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{folder} is an image-text model with a Pixtral vision tower without "
                                    "preprocessor_config.json: copy the image processor's settings from the model "
                                    "it was trained from")
        processor = PixtralImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        return cls(processor, ids, patch, merge, limits)

    @property
    def factor(self) -> int:
        """The pixels of one merged patch's side: each resized side is a multiple of it."""
        return self.patch_size * self.merge_size

    def process(self, images: list[Any]) -> list[tuple[Any, tuple[int, int, int], str]]:
        """Each image (PIL, RGB) -> (pixel values [1, 3, H, W], (1, H, W) in patches, content hash)."""
        out = []
        for image in images:
            self.resized(*image.size)  # ImageError for a side resized to no pixels, before Pixtral's processor
            batch = self.image_processor(images=[image], return_tensors="pt", patch_size=self.factor)
            height, width = (int(v) for v in batch["image_sizes"][0])
            digest = hashlib.blake2b(image.tobytes(), digest_size=16)
            digest.update(repr((image.size, image.mode)).encode())
            grid = (1, height // self.patch_size, width // self.patch_size)
            out.append((batch["pixel_values"], grid, digest.hexdigest()))
        return out

    def expand(self, token_ids: list[int], images: list[Any]) -> tuple[list[int], MultiModalInputs]:
        """Token ids with each [IMG] replaced by its image's rows, and the images' engine inputs.
        ValueError when the prompt holds another number of placeholders than images."""
        if len(images) > self.limits.max_images:
            raise ImageError(f"{len(images)} images in one prompt; at most {self.limits.max_images} are allowed "
                             "(--limit-mm-per-prompt)")
        places = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(places) != len(images):
            raise ValueError(f"the prompt holds {len(places)} image placeholder(s) ({self.image_token}) for "
                             f"{len(images)} image(s)")
        ids: list[int] = []
        inputs: list[ImageInput] = []
        cursor = 0
        for place, (pixels, grid, digest) in zip(places, self.process(images), strict=True):
            ids.extend(token_ids[cursor:place])
            span = self._span(grid[1] // self.merge_size, grid[2] // self.merge_size)
            inputs.append(ImageInput(digest, len(ids), len(span), grid, pixels))
            ids.extend(span)
            cursor = place + 1
        ids.extend(token_ids[cursor:])
        return ids, MultiModalInputs(tuple(inputs))

    def _span(self, rows: int, cols: int) -> list[int]:
        span = ([self.image_token_id] * cols + [self.break_token_id]) * rows
        span[-1] = self.end_token_id
        return span

    def num_tokens(self, width: int, height: int) -> int:
        """Tokens an image of this size becomes (for admission, before processing)."""
        h, w = self.resized(width, height)
        return (h // self.factor) * (w // self.factor + 1)

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) in pixels an image of this size is resized to, as Pixtral's image processor
        does: scaled down to fit the bound, each side then rounded up to whole merged patches. An extreme
        aspect ratio (1 x 3100 pixels) scales one side to no pixels, which no patch grid holds: ImageError
        (the API's 400) with the numbers."""
        import numpy as np
        from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

        size = self.image_processor.size
        edge = size.get("longest_edge")
        bound = (int(edge), int(edge)) if edge else (int(size["height"]), int(size["width"]))
        shape = np.broadcast_to(np.zeros((), dtype=np.uint8), (3, height, width))  # its shape, no pixels
        h, w = (int(v) for v in get_resize_output_image_size(shape, bound, (self.factor, self.factor), "channels_first"))
        if h <= 0 or w <= 0:  # the shorter side scaled below one pixel
            side = "width" if w <= 0 else "height"
            hint = f": its longer side may be at most {int(edge)} times its shorter side" if edge else ""
            raise ImageError(f"the image's size, {width}x{height} pixels, is too extreme for this model's patch grid "
                             f"({self.factor}-pixel patches): scaled down to fit {bound[1]}x{bound[0]} pixels, its "
                             f"{side} becomes 0 pixels; crop or pad the image{hint}")
        return h, w
