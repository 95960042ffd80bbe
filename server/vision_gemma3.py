"""Gemma 3's images to engine inputs, as its Hugging Face processor makes them: each image resized to
the vision tower's square (Gemma3ImageProcessor), and each <start_of_image> in the rendered prompt
becoming "\\n\\n<start_of_image>" + mm_tokens_per_image image soft tokens + "<end_of_image>\\n\\n".

The processor inserts that text before tokenizing, so its newlines join the text around them ("\\n"
+ "\\n\\n" is one "\\n\\n\\n" token in Gemma's vocabulary). Here the prompt is already token ids: the
text between two added tokens (where a tokenizer splits text first) that gains newlines is decoded
and encoded again with them, which is what tokenizing the processor's text gives."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .engine.mm_inputs import ImageInput, MultiModalInputs
from .vision_processor import ImageError, ImageLimits, VisionProcessor

logger = logging.getLogger(__name__)

NEWLINES = "\n\n"  # what Gemma3Processor puts on either side of an image


class Gemma3VisionProcessor(VisionProcessor):
    """Gemma 3's image processor and tokens; `expand` as VisionProcessor's, for Gemma's layout."""

    def __init__(self, image_processor: Any, tokenizer: Any, cfg: dict[str, Any], limits: ImageLimits) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.limits = limits
        self.image_token_id = int(cfg.get("image_token_id", cfg.get("image_token_index", 262_144)))
        self.boi_token_id = int(cfg.get("boi_token_id", cfg.get("boi_token_index", 255_999)))
        self.eoi_token_id = int(cfg.get("eoi_token_id", cfg.get("eoi_token_index", 256_000)))
        self.num_image_tokens = int(cfg.get("mm_tokens_per_image") or 256)
        self.image_token = str(tokenizer.convert_ids_to_tokens(self.boi_token_id))  # the placeholder prompts hold
        # Where a tokenizer splits text before its model runs: text never merges across these.
        self.split_ids = frozenset(int(i) for i in tokenizer.added_tokens_decoder) | frozenset(tokenizer.all_special_ids)
        side = int(image_processor.size["height"]), int(image_processor.size["width"])
        self.grid = (1, side[0], side[1])

    @classmethod
    def from_gemma_folder(cls, folder: Path, cfg: dict[str, Any], limits: ImageLimits) -> Gemma3VisionProcessor | None:
        """The folder's image processor (preprocessor_config.json, or the processor's file), else Gemma
        3's settings for the vision tower's image size; the folder's tokenizer. None (text only, with
        a warning) when the tokenizer lacks the image tokens config.json names."""
        from transformers import AutoTokenizer
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        for key, default in (("boi_token_index", 255_999), ("eoi_token_index", 256_000), ("image_token_index", 262_144)):
            token = int(cfg.get(key.replace("_index", "_id"), cfg.get(key, default)))
            if not 0 <= token < len(tokenizer):
                logger.warning("%s: config.json %s %d is not a token of the model's tokenizer (%d tokens): images "
                               "cannot be placed in prompts, so the model is served for text only", folder, key,
                               token, len(tokenizer))
                return None
        if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
            processor = Gemma3ImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        else:
            size = int(cfg["vision_config"].get("image_size", 224))
            logger.info("%s has no preprocessor_config.json: images are resized to %dx%d and normalized to [-1, 1] "
                        "(Gemma 3's image processor settings)", folder, size, size)
            processor = Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                                image_std=[0.5] * 3)
        if processor.do_pan_and_scan:
            raise ValueError(f"{folder / 'preprocessor_config.json'} sets do_pan_and_scan, whose extra crops per image "
                             "sloth-serve does not make; set it to false")
        saved = folder / "processor_config.json"
        length = json.loads(saved.read_text()).get("image_seq_length") if saved.is_file() else None
        if length is not None and int(length) != int(cfg.get("mm_tokens_per_image") or 256):
            raise ValueError(f"{saved} has image_seq_length {length} but config.json mm_tokens_per_image "
                             f"{cfg.get('mm_tokens_per_image')}: the projector gives the latter")
        return cls(processor, tokenizer, cfg, limits)

    def process(self, images: list[Any]) -> list[tuple[Any, tuple[int, int, int], str]]:
        """Each image (PIL, RGB) -> (pixel values [1, 3, H, W], (1, H, W), content hash)."""
        out = []
        for image in images:
            pixels = self.image_processor(images=[image], return_tensors="pt", do_pan_and_scan=False)["pixel_values"]
            digest = hashlib.blake2b(image.tobytes(), digest_size=16)
            digest.update(repr((image.size, image.mode)).encode())
            out.append((pixels, self.grid, digest.hexdigest()))
        return out

    def expand(self, token_ids: list[int], images: list[Any]) -> tuple[list[int], MultiModalInputs]:
        """Token ids with each <start_of_image> become Gemma's image sequence, and the images' engine
        inputs. ValueError when the prompt holds another number of placeholders than images."""
        if len(images) > self.limits.max_images:
            raise ImageError(f"{len(images)} images in one prompt; at most {self.limits.max_images} are allowed "
                             "(--limit-mm-per-prompt)")
        places = token_ids.count(self.boi_token_id)
        if places != len(images):
            raise ValueError(f"the prompt holds {places} image placeholder(s) ({self.image_token}) for "
                             f"{len(images)} image(s)")
        processed = iter(self.process(images))
        ids: list[int] = []
        inputs: list[ImageInput] = []
        text: list[int] = []  # ordinary tokens since the last added token
        after_image = False
        for token in [*token_ids, None]:
            if token is not None and token not in self.split_ids:
                text.append(token)
                continue
            before_image = token == self.boi_token_id
            ids.extend(self._with_newlines(text, after_image, before_image))
            text = []
            after_image = before_image
            if before_image:
                pixels, grid, digest = next(processed)
                inputs.append(ImageInput(digest, len(ids) + 1, self.num_image_tokens, grid, pixels))
                ids.extend([self.boi_token_id, *[self.image_token_id] * self.num_image_tokens, self.eoi_token_id])
            elif token is not None:
                ids.append(token)
        return ids, MultiModalInputs(tuple(inputs))

    def _with_newlines(self, text: list[int], after_image: bool, before_image: bool) -> list[int]:
        """The tokens of text between two added tokens, with the newlines an image next to it adds."""
        if not after_image and not before_image:
            return text
        body = self.tokenizer.decode(text, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        joined = (NEWLINES if after_image else "") + body + (NEWLINES if before_image else "")
        return list(self.tokenizer.encode(joined, add_special_tokens=False))

    def num_tokens(self, width: int, height: int) -> int:
        """Tokens an image becomes, whatever its size (it is resized to the tower's square): its image
        tokens and the two around them (the newlines at most add two more)."""
        return self.num_image_tokens + 4
