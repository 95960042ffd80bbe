"""Llama 3.2 Vision's images to engine inputs, as MllamaProcessor makes them: each image split into
up to max_image_tiles tiles (MllamaImageProcessor: pixels padded to the maximum, an aspect ratio id),
and its <|image|> token left as it is, one token: the image enters through cross-attention layers,
not in place of placeholder tokens (sloth_serve.models.mllama)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .engine.mm_inputs import ImageInput, MultiModalInputs
from .vision_processor import ImageError, ImageLimits, VisionProcessor

IMAGE_TOKEN = "<|image|>"


class MllamaVisionProcessor(VisionProcessor):
    """Mllama's image processor and image token; `expand` keeps the token ids as they are."""

    def __init__(self, image_processor: Any, image_token_id: int, limits: ImageLimits) -> None:
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_token = IMAGE_TOKEN
        self.limits = limits

    @classmethod
    def from_mllama_folder(cls, folder: Path, cfg: dict[str, Any], limits: ImageLimits) -> MllamaVisionProcessor:
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{folder} is a Llama 3.2 Vision model without preprocessor_config.json: copy the "
                                    "image processor's settings from the model it was trained from")
        processor = MllamaImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        max_tiles = int(cfg.get("vision_config", {}).get("max_num_tiles", 4))
        if int(processor.max_image_tiles) != max_tiles:
            raise ValueError(f"{folder / 'preprocessor_config.json'} has max_image_tiles {processor.max_image_tiles} "
                             f"but the vision encoder takes {max_tiles} tiles (config.json vision_config.max_num_tiles)")
        return cls(processor, int(cfg.get("image_token_index", 128_256)), limits)

    def process(self, images: list[Any]) -> list[tuple[Any, tuple[int, int, int], str]]:
        """Each image (PIL, RGB) -> (pixel values [max tiles, 3, H, W], (1, aspect ratio id, tiles),
        content hash). The grid's fields carry what the encoder takes besides the pixels."""
        out = []
        for image in images:
            batch = self.image_processor(images=[[image]], return_tensors="pt")
            ratio_id = int(batch["aspect_ratio_ids"][0, 0])
            tiles = int(batch["aspect_ratio_mask"][0, 0].sum())
            digest = hashlib.blake2b(image.tobytes(), digest_size=16)
            digest.update(repr((image.size, image.mode)).encode())
            out.append((batch["pixel_values"][0, 0], (1, ratio_id, tiles), digest.hexdigest()))
        return out

    def expand(self, token_ids: list[int], images: list[Any]) -> tuple[list[int], MultiModalInputs]:
        """The token ids as they are, and the images' engine inputs (one <|image|> token each).
        ValueError when the prompt holds another number of <|image|> tokens than images."""
        if len(images) > self.limits.max_images:
            raise ImageError(f"{len(images)} images in one prompt; at most {self.limits.max_images} are allowed "
                             "(--limit-mm-per-prompt)")
        places = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(places) != len(images):
            raise ValueError(f"the prompt holds {len(places)} image placeholder(s) ({self.image_token}) for "
                             f"{len(images)} image(s)")
        inputs = tuple(ImageInput(digest, place, 1, grid, pixels)
                       for place, (pixels, grid, digest) in zip(places, self.process(images), strict=True))
        return list(token_ids), MultiModalInputs(inputs, every_token=True)

    def num_tokens(self, width: int, height: int) -> int:
        return 1
