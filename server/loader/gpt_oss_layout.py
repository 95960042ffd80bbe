"""Unsloth's 4-bit gpt-oss checkpoints keep each expert as its own linear layer (`experts.gate_up_projs.N`,
`experts.down_projs.N`, so that bitsandbytes quantizes them) and the router as `router.linear`.
transformers' own GptOssForCausalLM has no such modules and would leave them unread (its 3-D experts
random); Unsloth swaps in classes of that layout when it recognizes a 4-bit gpt-oss load by the model's
name, whatever the layout on disk (its per-expert classes would in turn leave transformers' 3-D experts
unread). Here the layout is recognized from the tensor names on disk: Unsloth's classes are installed
for a per-expert folder, and its switch is turned off for a 3-D one (UNSLOTH_GPT_OSS_BNB4BIT_DISABLE),
for the load only."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PER_EXPERT_KEY = ".mlp.experts.gate_up_projs."


DISABLE = "UNSLOTH_GPT_OSS_BNB4BIT_DISABLE"


def is_gpt_oss(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "gpt_oss"
    except (OSError, ValueError, AttributeError):
        return False


def is_unsloth_gpt_oss_layout(folder: Path) -> bool:
    """A gpt-oss folder whose experts are stored per expert (Unsloth's bnb-4bit layout)."""
    from safetensors import safe_open

    if not is_gpt_oss(folder):
        return False
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if any(PER_EXPERT_KEY in key for key in f.keys()):  # noqa: SIM118 (safe_open is not a dict)
                return True
    return False


@contextmanager
def unsloth_gpt_oss_classes(folder: Path) -> Iterator[None]:
    """Within the block, transformers builds gpt-oss with Unsloth's per-expert classes when the
    folder is in that layout (Unsloth imported first); otherwise nothing changes."""
    if not is_gpt_oss(folder):
        yield
        return
    if not is_unsloth_gpt_oss_layout(folder):  # transformers' 3-D experts: its own classes must load them
        before = os.environ.get(DISABLE)
        os.environ[DISABLE] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(DISABLE, None)
            else:
                os.environ[DISABLE] = before
        return
    from unsloth_zoo.temporary_patches.gpt_oss import patch_gpt_oss_bnb4bit, restore_gpt_oss_original

    if not patch_gpt_oss_bnb4bit():
        raise ValueError(f"{folder} stores gpt-oss experts per expert (Unsloth's 4-bit layout), but this Unsloth "
                         "could not install its classes for that layout")
    try:
        yield
    finally:
        restore_gpt_oss_original()
