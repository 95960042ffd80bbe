"""A request's images as the engine receives them: each image's processed pixels, its grid, where its
placeholder tokens sit in the prompt, and a hash of its content (the encoder cache's and the prefix
cache's key). Torch-free: the tensors are carried, never touched here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ImageInput:
    content_hash: str  # of the decoded pixels and size: equal hashes, equal encoder outputs
    offset: int  # index of the image's first placeholder token in the prompt
    num_tokens: int  # its placeholder tokens (the encoder's output rows)
    grid_thw: tuple[int, int, int]  # patches in time, height, width, as the image processor made them
    pixel_values: Any  # torch.Tensor [patches, patch values], the model's image processor output

    def __post_init__(self) -> None:
        if self.offset < 0 or self.num_tokens < 1:
            raise ValueError(f"an image needs placeholder tokens at a prompt offset, got {self.num_tokens} at "
                             f"{self.offset}")


@dataclass(frozen=True, slots=True, weakref_slot=True)
class MultiModalInputs:
    images: tuple[ImageInput, ...]
    # every prompt token depends on every image (Llama 3.2 Vision: text before an image attends to
    # all of them), so every KV block's key carries all their hashes
    every_token: bool = False

    def __post_init__(self) -> None:
        ends = [0] + [img.offset + img.num_tokens for img in self.images]
        if any(img.offset < end for img, end in zip(self.images, ends, strict=False)):
            raise ValueError("images must be in prompt order and their placeholder tokens must not overlap")

    def check_prompt(self, token_ids: list[int], image_token_id: int | None) -> None:
        """Every image's placeholder tokens are in the prompt where it says (ValueError if not)."""
        for i, img in enumerate(self.images):
            span = token_ids[img.offset : img.offset + img.num_tokens]
            if len(span) != img.num_tokens or (image_token_id is not None and any(t != image_token_id for t in span)):
                raise ValueError(f"image {i}'s {img.num_tokens} placeholder tokens are not at prompt offset "
                                 f"{img.offset}")

    def salt(self, start: int, end: int) -> tuple[str, ...]:
        """Hashes of the images whose placeholder tokens fall in prompt positions [start, end): what
        a KV block's key adds to its token ids, so that another image never shares its cache."""
        if self.every_token:
            return tuple(img.content_hash for img in self.images)
        return tuple(img.content_hash for img in self.images if img.offset < end and img.offset + img.num_tokens > start)


def check_images(model: object, mm: MultiModalInputs, token_ids: list[int]) -> None:
    """ValueError unless the model takes images and each one's placeholder tokens are in the prompt."""
    if not getattr(model, "is_vision", False):
        raise ValueError("this model takes text only; a request with images needs an image-text model "
                         "(such as Qwen2.5-VL or Gemma 3)")
    layout = getattr(model, "image_token_layout", None)
    if layout is None:
        mm.check_prompt(token_ids, getattr(model, "image_token_id", None))
        return
    # Mistral 3: an image's tokens are rows of [IMG] tokens, each row closed by a break or end token
    mm.check_prompt(token_ids, None)
    for i, img in enumerate(mm.images):
        span = token_ids[img.offset : img.offset + img.num_tokens]
        if [t == model.image_token_id for t in span] != layout(img.grid_thw):  # type: ignore[attr-defined]
            raise ValueError(f"image {i}'s tokens at prompt offset {img.offset} are not the rows of image tokens "
                             f"its size gives")
