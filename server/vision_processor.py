"""Images to engine inputs for an image-text model, as its Hugging Face processor does it: the
image processor of the model's folder (preprocessor_config.json) resizes and patches each image,
and each image's one placeholder token in the rendered prompt becomes as many tokens as the encoder
gives it embeddings (Qwen2-VL / Qwen2.5-VL here; Gemma 3 in server/vision_gemma3.py; Mistral 3 in
server/vision_mistral3.py; Llama 3.2 Vision,
whose image token stays one token, in server/vision_mllama.py; server/vision_families.py picks a
folder's). Used by the HTTP API and the offline LLM alike."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine.mm_inputs import ImageInput, MultiModalInputs


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_images: int = 8  # per prompt (--limit-mm-per-prompt)
    max_pixels: int = 4096 * 4096  # of a decoded image, before the processor resizes it
    max_bytes: int = 20 * 2**20  # of an encoded image
    allowed_domains: tuple[str, ...] = ()  # http(s) image URLs are fetched from these (and subdomains) only
    fetch_timeout: float = 10.0  # seconds for one image URL


def image_limits(config: Any) -> ImageLimits:
    """The limits a sloth_serve.config.Config sets."""
    return ImageLimits(config.limit_mm_per_prompt, config.max_image_pixels, config.max_image_bytes,
                       tuple(config.allowed_media_domains), config.media_fetch_timeout)


class VisionProcessor:
    """The model's image processor and its placeholder token; `expand` turns a prompt whose every
    image is one placeholder token into the engine's token ids and MultiModalInputs."""

    def __init__(self, image_processor: Any, image_token_id: int, image_token: str, limits: ImageLimits) -> None:
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_token = image_token
        self.merge_size = int(image_processor.merge_size)
        self.limits = limits

    @classmethod
    def from_qwen_folder(cls, folder: Path, cfg: dict[str, Any], limits: ImageLimits) -> VisionProcessor:
        """The Qwen-VL families' processor of an image-text model's folder (server/vision_families.py
        picks a folder's family)."""
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{folder} is an image-text model ({cfg['architectures'][0]}) without "
                                    "preprocessor_config.json: copy the image processor's settings from the model "
                                    "it was trained from")
        # The PIL implementation: it needs no torchvision, and transformers picks it by default for
        # processors whose two implementations differ.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        image_token_id = int(cfg["image_token_id"])
        return cls(processor, image_token_id, "<|image_pad|>", limits)

    def process(self, images: list[Any]) -> list[tuple[Any, tuple[int, int, int], str]]:
        """Each image (PIL, RGB) -> (pixel values, grid (t, h, w), content hash)."""
        out = []
        for image in images:
            batch = self.image_processor(images=[image], return_tensors="pt")
            grid = tuple(int(v) for v in batch["image_grid_thw"][0])
            digest = hashlib.blake2b(image.tobytes(), digest_size=16)
            digest.update(repr((image.size, image.mode)).encode())
            out.append((batch["pixel_values"], (grid[0], grid[1], grid[2]), digest.hexdigest()))
        return out

    def expand(self, token_ids: list[int], images: list[Any]) -> tuple[list[int], MultiModalInputs]:
        """Token ids with each image's placeholder repeated once per embedding, and the images'
        engine inputs. ValueError when the prompt holds another number of placeholders than images."""
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
            n = grid[0] * grid[1] * grid[2] // self.merge_size**2
            inputs.append(ImageInput(digest, len(ids), n, grid, pixels))
            ids.extend([self.image_token_id] * n)
            cursor = place + 1
        ids.extend(token_ids[cursor:])
        return ids, MultiModalInputs(tuple(inputs))

    def num_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens an image of this size becomes (for admission, before processing)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        factor = int(ip.patch_size) * self.merge_size
        h, w = smart_resize(height, width, factor, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
        return (h // factor) * (w // factor)


class ImageError(ValueError):
    """An image that cannot be used: the message says which and why (the API's 400)."""


def open_image(image: Any, limits: ImageLimits, what: str = "image") -> Any:
    """A PIL RGB image from a PIL image or encoded bytes, within the limits; ImageError otherwise.
    The size is read from the header, so an image too large is refused before it is decoded."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) > limits.max_bytes:
            raise ImageError(f"{what} is {len(image)} bytes; at most {limits.max_bytes} are allowed")
        try:
            image = Image.open(io.BytesIO(bytes(image)))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageError(f"{what} could not be decoded as an image (PNG, JPEG, WebP, GIF, ...): {exc}") from exc
    elif not isinstance(image, Image.Image):
        raise ImageError(f"{what} must be a PIL image or encoded image bytes, not {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise ImageError(f"{what} is {width}x{height} pixels; at most {limits.max_pixels} pixels are allowed")
    try:
        return image.convert("RGB")  # decodes: truncated or corrupt data fails here
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{what} could not be decoded as an image: {exc}") from exc
