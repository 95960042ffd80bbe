"""What an image-text model's forward pass needs beyond token ids, built per step: M-RoPE's three
position rows for every token (Qwen2.5-VL), each token's key end where an image's tokens attend to
each other both ways (Gemma 3), and the image embeddings of the placeholder tokens the step computes.
Embeddings come from an LRU cache keyed by image content hash and, for an adapter with LoRA on the
vision tower, that adapter (another adapter's images share the base's encoding); only missing images
are encoded (a step's at once, one tower pass per such adapter), so a repeated image, or a prompt
chunked over several steps, is encoded once."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from ..models.tower_lora import TowerDeltas, tower_lora
from ..models.vision_step import VisionStep
from .cross_inputs import cross_step
from .mm_inputs import ImageInput, MultiModalInputs
from .sequence import Sequence

if TYPE_CHECKING:
    from ..models.vision import VisionCausalLM
    from .lora_manager import LoRAManager

ENCODER_CACHE_BYTES = 512 * 2**20  # image embeddings kept for reuse (about 50 1024x1024 images of a 7B)
MAX_DEVICE_DELTAS = 8  # adapters' vision LoRA kept on the device between steps

# An image's encoder-cache key: the adapter whose vision LoRA encoded it (0: the base tower) and its
# content hash.
ImageKey = tuple[int, str]


def mrope_positions(num_prompt_tokens: int, images: tuple[ImageInput, ...], merge: int) -> tuple[torch.Tensor, int]:
    """The prompt's [3, P] M-RoPE positions and the delta of what follows it (token p >= P sits at
    p + delta in all three rows). Text advances one position a token; an image's tokens take its
    (t, h, w) grid coordinates from the position where it starts, and the text after it starts past
    the larger of its merged height and width (Qwen2.5-VL's rule)."""
    parts: list[torch.Tensor] = []
    pos = cursor = 0
    for img in images:
        text = img.offset - cursor
        parts.append(torch.arange(text).expand(3, -1) + pos)
        pos += text
        t, h, w = img.grid_thw[0], img.grid_thw[1] // merge, img.grid_thw[2] // merge
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        parts.append(grid.reshape(3, -1) + pos)
        pos += max(h, w)
        cursor = img.offset + img.num_tokens
    parts.append(torch.arange(num_prompt_tokens - cursor).expand(3, -1) + pos)
    table = torch.cat(parts, dim=1)
    return table, int(table.max()) + 1 - num_prompt_tokens


class VisionInputs:
    """Per engine: builds each step's VisionStep for a VisionCausalLM."""

    def __init__(self, model: VisionCausalLM, device: torch.device, cache_bytes: int = ENCODER_CACHE_BYTES,
                 lora: LoRAManager | None = None) -> None:
        self.model = model
        self.lora = lora  # the adapters, whose LoRA on the vision tower encodes their requests' images
        self.mrope = getattr(model, "uses_mrope", True)
        self.bidirectional = getattr(model, "bidirectional_images", False)
        self.cross = getattr(model, "cross_attention_images", False)
        self.device = device
        self.cache_bytes = cache_bytes
        self.cache: OrderedDict[ImageKey, torch.Tensor] = OrderedDict()  # -> embeddings, LRU first
        # Vision LoRA on the device, in the tower's dtype, by adapter id: the last few used
        self._deltas: OrderedDict[int, TowerDeltas] = OrderedDict()
        self.cached_bytes = 0
        self.num_encoded = 0  # images run through the encoder (tests and metrics read it)
        self._positions: weakref.WeakKeyDictionary[MultiModalInputs, tuple[torch.Tensor, int]] = (
            weakref.WeakKeyDictionary())

    def step(self, seqs: list[Sequence], starts: list[int], counts: list[int]) -> VisionStep | None:
        """The step's vision inputs: sequence i computes positions [starts[i], starts[i] + counts[i]).
        None when no sequence of the step has images (plain positions then)."""
        if all(seq.mm is None for seq in seqs):
            return None
        if self.cross:
            found = cross_step(seqs, starts, counts, self._base_embeddings, self.model.valid_state_rows,  # type: ignore[attr-defined,arg-type]
                               self.device)
            return None if found is None else VisionStep(None, None, None, cross=found)
        rows: list[torch.Tensor] = []
        spans: list[tuple[ImageInput, int, int, int]] = []  # image, its rows [a, b), first flat-batch row
        keys: list[ImageKey] = []  # each span's encoder-cache key
        flat = 0
        for seq, start, n in zip(seqs, starts, counts, strict=True):
            if self.mrope:
                rows.append(self._seq_positions(seq, start, start + n))
            tower = self.tower_adapter(seq.adapter_id)
            for img in seq.mm.images if seq.mm is not None else ():
                lo, hi = max(start, img.offset), min(start + n, img.offset + img.num_tokens)
                if lo < hi:
                    spans.append((img, lo - img.offset, hi - img.offset, flat + lo - start))
                    keys.append((tower, img.content_hash))
            flat += n
        positions = torch.cat(rows, dim=1).to(self.device) if self.mrope else None
        if not spans:
            return VisionStep(positions, None, None)
        embeds = self._embeddings([(tower, img) for (tower, _), (img, _, _, _) in zip(keys, spans, strict=True)])
        parts = torch.cat([embeds[key][a:b] for key, (_, a, b, _) in zip(keys, spans, strict=True)])
        index = torch.cat([torch.arange(row, row + b - a) for _, a, b, row in spans]).to(self.device)
        key_ends = self._key_ends(spans, flat) if self.bidirectional else None
        return VisionStep(positions, index, parts, key_ends)

    @staticmethod
    def computes_images(seqs: list[Sequence], counts: list[int]) -> bool:
        """Whether a step (each sequence computing counts[i] tokens from its computed ones) holds
        some image token."""
        for seq, n in zip(seqs, counts, strict=True):
            start = seq.num_computed_tokens
            if seq.mm is not None and any(img.offset < start + n and img.offset + img.num_tokens > start
                                          for img in seq.mm.images):
                return True
        return False

    def _key_ends(self, spans: list[tuple[ImageInput, int, int, int]], num_tokens: int) -> torch.Tensor:
        """Each token of an image sees up to its image's last token; the scheduler never ends a chunk
        inside an image, so those keys are computed by this step at the latest."""
        ends = torch.zeros(num_tokens, dtype=torch.int32)
        for img, a, b, row in spans:
            if b != img.num_tokens:
                raise ValueError(f"a prefill chunk ends inside an image (its tokens {a}..{b} of {img.num_tokens}), "
                                 "whose tokens attend to each other both ways")
            ends[row : row + b - a] = img.offset + img.num_tokens
        return ends.to(self.device)

    def _seq_positions(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        if seq.mm is None:
            return torch.arange(start, end).expand(3, -1)
        known = self._positions.get(seq.mm)
        if known is None:
            known = self._positions[seq.mm] = mrope_positions(seq.num_prompt_tokens, seq.mm.images,
                                                              self.model.spatial_merge_size)
        table, delta = known
        prompt = table[:, start : min(end, seq.num_prompt_tokens)]
        after = torch.arange(max(start, seq.num_prompt_tokens), max(end, seq.num_prompt_tokens)).expand(3, -1) + delta
        return torch.cat([prompt, after], dim=1)

    def plain_position(self, seq: Sequence, p: int) -> int | None:
        """The one position that stands for token p's M-RoPE rows where all three are equal (text, and
        every token after the prompt: its index plus the prompt's delta), so that a step built for
        plain RoPE (a decode CUDA graph) rotates it right; None for an image's token: its embedding
        comes from the encoder, which such a step does not splice in, even where its rows are equal
        (an image's first token sits at the same position in all three)."""
        if seq.mm is None:
            return p
        if any(img.offset <= p < img.offset + img.num_tokens for img in seq.mm.images):
            return None
        if not self.mrope:
            return p
        rows = self._seq_positions(seq, p, p + 1)[:, 0]
        return int(rows[0]) if bool((rows == rows[0]).all()) else None

    def tower_adapter(self, adapter_id: int) -> int:
        """The adapter whose vision LoRA encodes a request's images: its own if it has one, else the
        base tower (0), whose encodings it shares."""
        if adapter_id and self.lora is not None and self.lora.vision_lora(adapter_id) is not None:
            return adapter_id
        return 0

    def forget_adapter(self, adapter_id: int) -> None:
        """Drop a removed adapter's encodings and its LoRA's device copies (ids are never reused, so
        they would only wait for eviction)."""
        self._deltas.pop(adapter_id, None)
        for key in [key for key in self.cache if key[0] == adapter_id]:
            old = self.cache.pop(key)
            self.cached_bytes -= old.numel() * old.element_size()

    def _base_embeddings(self, images: list[ImageInput]) -> dict[str, torch.Tensor]:
        """The base tower's embeddings by content hash (cross-attention images take no vision LoRA)."""
        return {digest: e for (_, digest), e in self._embeddings([(0, img) for img in images]).items()}

    def _embeddings(self, images: list[tuple[int, ImageInput]]) -> dict[ImageKey, torch.Tensor]:
        """Embeddings of each distinct (tower adapter, image), from the cache or encoded now: the
        missing ones together, one tower pass per adapter with that adapter's LoRA."""
        out: dict[ImageKey, torch.Tensor] = {}
        missing: dict[int, dict[str, ImageInput]] = {}
        for tower, img in images:
            key = (tower, img.content_hash)
            if key in out or img.content_hash in missing.get(tower, {}):
                continue
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                out[key] = hit
            else:
                missing.setdefault(tower, {})[img.content_hash] = img
        for tower, group in missing.items():
            todo = list(group.values())
            linears = self.lora.vision if self.lora is not None and self.lora.vision is not None else {}
            with tower_lora(linears, self._tower_deltas(tower)):
                encoded = self.model.encode_images([i.pixel_values for i in todo], [i.grid_thw for i in todo])
            self.num_encoded += len(todo)
            for img, emb in zip(todo, encoded, strict=True):
                if not self.cross and emb.shape[0] != img.num_tokens:
                    raise ValueError(f"the vision encoder gave {emb.shape[0]} embeddings for an image with "
                                     f"{img.num_tokens} placeholder tokens")
                out[(tower, img.content_hash)] = emb
                self._remember((tower, img.content_hash), emb)
        return out

    def _tower_deltas(self, tower: int) -> TowerDeltas | None:
        """The adapter's vision LoRA on the tower's device, in its linears' dtypes (None: the base)."""
        linears = self.lora.vision if self.lora is not None else None
        host = self.lora.vision_lora(tower) if tower and self.lora is not None else None
        if linears is None or host is None:
            return None
        known = self._deltas.get(tower)
        if known is None:
            known = self._deltas[tower] = {name: (a.to(**_placed(linears[name])), b.to(**_placed(linears[name])))
                                           for name, (a, b) in host.items()}
            while len(self._deltas) > MAX_DEVICE_DELTAS:
                self._deltas.popitem(last=False)
        self._deltas.move_to_end(tower)
        return known

    def _remember(self, key: ImageKey, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.cache_bytes:
            return
        self.cache[key] = emb
        self.cached_bytes += size
        while self.cached_bytes > self.cache_bytes:
            _, old = self.cache.popitem(last=False)
            self.cached_bytes -= old.numel() * old.element_size()


def _placed(linear: torch.nn.Linear) -> dict[str, Any]:
    """Where and in which dtype a linear computes (a 4-bit one: its compute dtype, not its bytes')."""
    weight = linear.weight
    dtype = weight.dtype if weight.is_floating_point() else getattr(linear, "compute_dtype", None) or torch.float16
    return {"device": weight.device, "dtype": dtype}
