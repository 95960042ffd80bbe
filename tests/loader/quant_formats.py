"""Tiny 4-bit checkpoints written the way transformers + bitsandbytes write them (the format of
Unsloth's `-bnb-4bit` and dynamic `-unsloth-bnb-4bit` repositories), from the embedded demo model,
and the check of our greedy tokens against Unsloth's `for_inference` model on the same folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from sloth_serve.loader import DEMO_MODEL

# The kind of mix Unsloth's dynamic quants leave in 16-bit: single projections here and there,
# including parts of what our engine fuses (q|k|v, gate|up).
DYNAMIC_SKIPS = [
    "lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    "model.layers.2.self_attn.v_proj", "model.layers.3.mlp.up_proj", "model.layers.3.self_attn.o_proj",
]


@dataclass(frozen=True)
class QuantFormat:
    name: str
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip_modules: list[str] | None = None  # None: transformers' default (lm_head stays 16-bit)
    blocksize: int = 64
    untie_lm_head: bool = False  # a separate lm_head, so it can be quantized too
    tags: dict[str, str] = field(default_factory=dict)


FORMATS = [
    QuantFormat("nf4-double-bf16"),
    QuantFormat("dynamic-nf4", skip_modules=DYNAMIC_SKIPS),
    QuantFormat("nf4-single-fp16", double_quant=False, compute_dtype=torch.float16),
    QuantFormat("fp4", quant_type="fp4"),
    QuantFormat("nf4-blocksize128", blocksize=128),
    QuantFormat("lm-head-4bit", skip_modules=[], untie_lm_head=True),
]


def untied_demo(folder: Path) -> Path:
    """The demo model with lm_head as its own tensor (a copy of the embedding, slightly changed)."""
    shutil.copytree(DEMO_MODEL, folder)
    model = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.bfloat16)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone() * 1.01)
    model.save_pretrained(folder)
    return folder


def requantize_blocksize(model: torch.nn.Module, blocksize: int) -> None:
    """Quantize every bitsandbytes 4-bit weight again with another block size (transformers' config
    has no field for it, but the serialized quant state carries it, and loading honours it)."""
    import bitsandbytes.functional as bnbf

    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None:
            continue
        dense = bnbf.dequantize_4bit(weight.data, state)
        data, new_state = bnbf.quantize_4bit(dense, blocksize=blocksize, compress_statistics=state.nested,
                                             quant_type=state.quant_type)
        weight.data, weight.quant_state, weight.blocksize = data, new_state, blocksize


def write_quantized(fmt: QuantFormat, root: Path) -> Path:
    """Quantize the demo model with bitsandbytes on load and save it: a pre-quantized folder."""
    source = untied_demo(root / "untied") if fmt.untie_lm_head else DEMO_MODEL
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=fmt.quant_type, bnb_4bit_use_double_quant=fmt.double_quant,
        bnb_4bit_compute_dtype=fmt.compute_dtype, llm_int8_skip_modules=fmt.skip_modules,
    )
    model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=config, dtype=torch.bfloat16)
    if fmt.blocksize != 64:
        requantize_blocksize(model, fmt.blocksize)
    folder = root / fmt.name
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(DEMO_MODEL)).save_pretrained(folder)
    return folder


def quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def computes_in_16_bits(reference: torch.nn.Module) -> bool:
    return bool({p.dtype for p in reference.parameters() if p.is_floating_point()} & {torch.bfloat16, torch.float16})


def exact_needed(reference: torch.nn.Module, runs: int, tie: float) -> int:
    """How many of `runs` greedy runs must equal the reference's exactly (the rest near ties): all but
    one, or half where the reference computes in 16 bits and we do not (`tie` is our dtype's): its
    rounding then parts from ours at more near ties."""
    return runs // 2 if computes_in_16_bits(reference) and tie < 0.25 else runs - 1


@torch.no_grad()
def compare_greedy(reference: torch.nn.Module, prompt: list[int], ours: list[int], tie: float) -> str:
    """Our greedy tokens against the reference model's own greedy `generate`, token for token. Where
    they part, the reference must be undecided there: its logit for our token within `tie` of its
    best (16-bit rounding can flip a near tie); past that point the texts differ by construction.
    Returns "exact" or "tie at i"; raises AssertionError on a real difference. A reference computing in
    16 bits (Unsloth loads in bfloat16 on CPUs that have it) rounds its own logits that coarsely: its
    ties are 16-bit ties whatever our dtype."""
    device = next(reference.parameters()).device
    if computes_in_16_bits(reference):
        tie = max(tie, 0.25)
    out = reference.generate(torch.tensor([prompt], device=device), max_new_tokens=len(ours), do_sample=False)  # type: ignore[operator]
    theirs = out[0, len(prompt):].tolist()
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a == b:
            continue
        logits = reference(torch.tensor([prompt + ours[:i]], device=device)).logits[0, -1].float()
        gap = float(logits.max() - logits[a])
        assert gap <= tie, (f"token {i}: ours {a}, reference {b}, the reference's logit for ours is {gap:.4f} "
                            f"below its best (not a tie); ours {ours}, reference {theirs}")
        return f"tie at {i}"
    assert len(theirs) >= len(ours) or theirs[-1:] == [reference.generation_config.eos_token_id], (ours, theirs)
    return "exact"
