"""Checkpoint projection names and our fused modules: q|k|v load into one qkv_proj and gate|up into
one gate_up_proj, each HF projection filling a slice. A ground floor of names, read by the weight
loader, the generic path's linears and the adapter loader alike."""

from __future__ import annotations

# HF projection name -> (our fused module, slice index)
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def fused_target(name: str) -> tuple[str, int | None]:
    """Map an HF parameter name to ours, and the slice of a fused projection it fills."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in FUSED:
            fused, index = FUSED[part]
            return ".".join([*parts[:i], fused, *parts[i + 1 :]]), index
    return name, None
