"""Host values to the device without waiting for it."""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device`, queued behind the GPU's work rather than waiting
    for it. `torch.tensor(values, device=cuda)` copies with non_blocking=False, which synchronizes
    the stream: after a queued forward pass the host would sit until the GPU finished it, and
    nothing queued behind it (the hand-over of outputs, the next step's preparation) would overlap
    it. From pinned memory (PyTorch's caching host allocator keeps the block until the copy is
    done) the copy is queued."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
