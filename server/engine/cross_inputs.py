"""Per-step inputs of a model whose images enter through cross-attention layers (Llama 3.2 Vision):
which flat-batch rows belong to sequences with images, and which of its own sequence's image states
each row may see (each sequence attends to its own images only, so the work grows with the batch,
not with its square). A prompt's image
token opens its image to itself and the tokens after it, up to the next image token (consecutive
image tokens open their images together), as transformers' MllamaProcessor builds its mask;
generated tokens see what the last prompt token sees. A row that sees no image (text before the
first image) attends to all of its sequence's image states, and its cross-attention layers' MLP is
zeroed, as in transformers' MllamaModel; sequences without images skip those layers entirely.
A sequence's images' states are turned into keys and values once, at its first step (CrossKV, kept on
the sequence until its KV blocks are freed: sloth_serve.engine.cross_kv); later steps attend to those."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..models.vision_step import CrossKV, CrossStep
from .mm_inputs import ImageInput
from .sequence import Sequence

if TYPE_CHECKING:
    from collections.abc import Callable


def image_ranges(offsets: list[int], num_prompt_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of the prompt positions each image is visible from (transformers'
    get_cross_attention_token_mask on the image tokens' offsets); the last end covers what follows."""
    if len(offsets) == 1:
        return [(offsets[0], 1 << 62)]
    ends = [*offsets[1:], num_prompt_tokens]
    last_end = ends[-1]
    for j in range(len(offsets) - 1, -1, -1):  # consecutive image tokens open their images together
        if offsets[j] == ends[j] - 1:
            ends[j] = last_end
        last_end = ends[j]
    return list(zip(offsets, ends, strict=True))


def cross_step(seqs: list[Sequence], starts: list[int], counts: list[int],
               embeddings: Callable[[list[ImageInput]], dict[str, torch.Tensor]],
               valid_rows: Callable[[tuple[int, int, int]], int], device: torch.device) -> CrossStep | None:
    """The step's CrossStep; None when no sequence of it has images. A sequence running for the
    first time gets its CrossKV over its images' states: `embeddings` gives each image's states
    [tiles * patches, hidden] (all of its padded tiles), `valid_rows` how many of them are its real
    tiles' (from its grid)."""
    with_images = [i for i, seq in enumerate(seqs) if seq.mm is not None and seq.mm.images]
    if not with_images:
        return None
    new = [seqs[i] for i in with_images if seqs[i].cross_kv is None]
    if new:
        embeds = embeddings([img for seq in new for img in seq.mm.images])  # type: ignore[union-attr]
        for seq in new:
            blocks = [embeds[img.content_hash] for img in seq.mm.images]  # type: ignore[union-attr]
            seq.cross_kv = CrossKV(torch.cat(blocks), [b.shape[0] for b in blocks])
    flat_starts = [0]
    for n in counts:
        flat_starts.append(flat_starts[-1] + n)
    rows: list[torch.Tensor] = []
    allowed: list[torch.Tensor] = []  # per sequence with images: [its rows, its state columns]
    seen: list[torch.Tensor] = []
    for i in with_images:
        seq, start, n = seqs[i], starts[i], counts[i]
        images = seq.mm.images  # type: ignore[union-attr]
        col = torch.tensor([0, *seq.cross_kv.widths]).cumsum(0).tolist()
        valid = torch.zeros(len(images), col[-1], dtype=torch.bool)  # image j's real tiles' columns
        for j, img in enumerate(images):
            valid[j, col[j] : col[j] + valid_rows(img.grid_thw)] = True
        ranges = torch.tensor(image_ranges([img.offset for img in images], seq.num_prompt_tokens))
        # generated tokens (and draft tokens) see what the last prompt token sees
        pos = torch.arange(start, start + n).clamp(max=seq.num_prompt_tokens - 1)
        sees = (pos[:, None] >= ranges[:, 0]) & (pos[:, None] < ranges[:, 1])  # [n, images]
        mask = (sees.float() @ valid.float()) > 0
        sees_any = sees.any(dim=1)
        mask[~sees_any] = True
        rows.append(torch.arange(flat_starts[i], flat_starts[i] + n))
        allowed.append(mask.to(device))
        seen.append(sees_any)
    owners = torch.tensor([flat_starts[i] for i in with_images])
    return CrossStep(torch.cat(rows).to(device), [seqs[i].cross_kv for i in with_images], owners.to(device),
                     allowed, torch.cat(seen).float().to(device))
