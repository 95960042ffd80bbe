"""Tiny random Phi3ForCausalLM folders (Phi-3-mini-like and Phi-4-mini-like) with the demo model's
tokenizer, for the loading, adapter and server tests of the Phi-3 family."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import transformers

from sloth_serve.loader import DEMO_MODEL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def longrope(rotary_dim: int) -> dict[str, Any]:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.0 + 3.0 * i for i in range(half)]}


# The demo tokenizer's vocabulary and special ids; two layers, GQA.
COMMON: dict[str, Any] = dict(vocab_size=4096, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              initializer_range=0.1, eos_token_id=2, pad_token_id=0, bos_token_id=None)
SHAPES: dict[str, dict[str, Any]] = {
    # Phi-4-mini-like: 3/4 of each 64-dim head rotated, longrope past 64 tokens, tied embeddings. Its
    # slices are whole double-quantization blocks (16384 values), so 4-bit q|k|v also splits into views.
    "phi4-mini": dict(hidden_size=256, intermediate_size=512, max_position_embeddings=512,
                      original_max_position_embeddings=64, partial_rotary_factor=0.75, rope_scaling=longrope(48),
                      tie_word_embeddings=True),
    # Phi-3-mini-like: full rotary, a sliding window, separate lm_head; slices smaller than one block.
    "phi3-mini": dict(hidden_size=64, intermediate_size=128, max_position_embeddings=512, sliding_window=24,
                      tie_word_embeddings=False),
}


def write_phi3(folder: Path, shape: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random Phi3ForCausalLM of `shape` saved in `dtype` with the demo tokenizer beside it."""
    torch.manual_seed(seed)
    cfg = transformers.Phi3Config(**COMMON, **SHAPES[shape])
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # random norms, so that their code paths matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.to(dtype).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (DEMO_MODEL / name).is_file():
            shutil.copy(DEMO_MODEL / name, folder / name)
    return folder
