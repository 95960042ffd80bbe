"""An adapter keeps the weights it was loaded with when its folder is written again in place (a
trainer saving over it, `cp` onto the file): its tensors are read into memory, not left mapped onto
the file, where a rewrite would change them silently and a truncation would crash with SIGBUS."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from sloth_serve.loader import DEMO_ADAPTER
from sloth_serve.loader.peft import load_lora


def test_an_adapter_rewritten_in_place_keeps_its_loaded_weights(tmp_path: Path) -> None:
    folder = tmp_path / "upper"
    shutil.copytree(DEMO_ADAPTER, folder)
    weights = load_lora("upper", folder, max_rank=64)
    before = {k: (a.clone(), b.clone()) for k, (a, b) in weights.tensors.items()}
    # The same layout (header) with other values, written into the same file (as `cp` does).
    path = folder / "adapter_model.safetensors"
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    with path.open("r+b") as f:
        f.seek(header)
        f.write(bytes(len(raw) - header))
    assert all(not t.any() for t in load_file(str(path)).values())  # the file holds zeros now
    for key, (a, b) in weights.tensors.items():
        assert torch.equal(a, before[key][0]) and torch.equal(b, before[key][1])
    # Truncated: the loaded weights are still readable (a mapped tensor would raise SIGBUS here).
    path.write_bytes(b"")
    assert sum(float(a.abs().sum()) for a, _ in weights.tensors.values()) > 0
