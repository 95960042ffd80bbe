"""What an image-text model's forward pass reads beyond token ids, one record per step: the engine
builds them (server/engine/vision_inputs.py, server/engine/cross_inputs.py) and hands them down in
StepMetadata.vision; the models read them. Records only, so the models need nothing of the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True, eq=False)
class CrossKV:
    """One sequence's cross-attention keys and values (Llama 3.2 Vision): per cross-attention layer,
    [kv heads, N, head dim] over its images' N states, projected by the model (with the sequence's
    adapter) the first time the layer runs for it. Sequence.cross_kv holds it, so it lives as long as
    the sequence's KV blocks (server/engine/cross_kv.py)."""

    states: torch.Tensor | None  # [N, hidden] its images' states (projected encoder outputs), until every layer's K/V is computed
    widths: list[int]  # state rows of each image (all of its padded tiles')
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> keys, values


@dataclass(slots=True)
class CrossStep:
    """Models whose images enter through cross-attention layers (Llama 3.2 Vision)."""

    rows: torch.Tensor  # [R] flat-batch rows of the sequences with images, in batch order (the others skip cross layers)
    kv: list[CrossKV]  # those sequences' keys and values, in batch order
    owners: torch.Tensor  # [len(kv)] a flat-batch row of each of those sequences (its adapter slot: LoRA on k/v)
    # per sequence of kv: [its rows, its N_i states] bool, the states each of its rows attends to (its
    # rows are the next allowed[s].shape[0] of `rows`)
    allowed: list[torch.Tensor]
    row_sees_image: torch.Tensor  # [R] 1.0 where the row's token sees an image, else 0.0 (its MLP is zeroed)


@dataclass(slots=True)
class VisionStep:
    positions: torch.Tensor | None  # [3, T] M-RoPE rows (temporal, height, width); None: one per token
    rows: torch.Tensor | None  # flat-batch rows of the image placeholder tokens computed this step
    embeds: torch.Tensor | None  # their embeddings [len(rows), hidden], in the same order
    # [T] int32: where a token's visible keys end (its image's end, 0 outside images: causal), for
    # models whose image tokens attend both ways; None otherwise or with no image token this step.
    key_ends: torch.Tensor | None = None
    # models whose images enter through cross-attention layers (Llama 3.2 Vision): what those attend to
    cross: CrossStep | None = None
