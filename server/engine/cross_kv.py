"""Memory for the cross-attention keys and values of sequences with images (Llama 3.2 Vision): each
such sequence keeps its own, computed once from its images' states when it first runs and attended
to by every later step, until its KV blocks are freed (finish, abort, preemption). Their bytes come
from a budget set aside from the KV cache's memory at start-up; a sequence whose images do not fit
what is left waits in the queue, as one does for KV blocks. Like the block manager, this holds no
tensors: the model runner's per-sequence keys and values hang on Sequence.cross_kv."""

from __future__ import annotations

from .sequence import Sequence

# Room kept for this many images' cross-attention K/V at once (or for one prompt at the per-prompt
# image limit, if larger): 16 images of Llama 3.2 11B Vision (about 210 MB each in bf16) take 3.4 GB.
CROSS_KV_IMAGES = 16


class CrossKVBudget:
    def __init__(self, num_bytes: int, bytes_per_image: int) -> None:
        if bytes_per_image < 1 or num_bytes < bytes_per_image:
            raise ValueError(f"a cross-attention K/V budget of {num_bytes} bytes holds no image of {bytes_per_image}")
        self.num_bytes = num_bytes
        self.bytes_per_image = bytes_per_image
        self.num_used = 0  # bytes reserved by running sequences

    @property
    def num_free(self) -> int:
        return self.num_bytes - self.num_used

    def bytes_for(self, seq: Sequence) -> int:
        """What the sequence's keys and values take: every one of its images' (0 without images)."""
        return len(seq.mm.images) * self.bytes_per_image if seq.mm is not None else 0

    def can_allocate(self, seq: Sequence) -> bool:
        return bool(seq.cross_kv_bytes) or self.bytes_for(seq) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Reserve the sequence's bytes (it keeps what it has)."""
        if not seq.cross_kv_bytes:
            need = self.bytes_for(seq)
            if need > self.num_free:
                raise RuntimeError("no room for the sequence's cross-attention K/V (can_allocate was not checked)")
            seq.cross_kv_bytes = need
            self.num_used += need

    def free(self, seq: Sequence) -> None:
        """Release the bytes and drop the keys and values (a preempted sequence computes them again)."""
        self.num_used -= seq.cross_kv_bytes
        seq.cross_kv_bytes = 0
        seq.cross_kv = None
