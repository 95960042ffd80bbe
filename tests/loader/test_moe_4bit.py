"""4-bit mixture-of-experts checkpoints (bitsandbytes, as Unsloth's `-bnb-4bit` repositories are
written) through Unsloth on the CPU: attention and dense MLPs stay NF4, the 3-D expert weights that
bitsandbytes leaves in 16-bit are served in 16-bit, every tensor on disk is read, and the greedy
tokens equal transformers computing with exactly the same weights (and Unsloth's own model, up to
near ties, where it runs in float32 throughout)."""

from __future__ import annotations

import sys
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from quant_formats import compare_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.unsloth import load_hf_with_unsloth
from sloth_serve.models.moe import Experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_moe_families import make_model  # the tiny random MoE models

PROMPTS = [[5, 17, 99, 200, 3], list(range(10, 40))]


def write_4bit(root: Path, family: str) -> Path:
    folder, _ = make_model(root, family)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, dtype=torch.bfloat16)
    model.save_pretrained(root / "4bit")
    AutoTokenizer.from_pretrained(str(DEMO_MODEL)).save_pretrained(root / "4bit")
    return root / "4bit"


@torch.no_grad()
def dequantized_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """Unsloth's model with every 4-bit layer replaced by a float32 Linear of exactly its
    dequantized weight, and everything else in float32: what our CPU run computes with."""
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if hasattr(weight, "quant_state"):
            parent, _, child = name.rpartition(".")
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
            if module.bias is not None:
                dense.bias.data = module.bias.data.float()
            setattr(model.get_submodule(parent), child, dense)
    for p in model.parameters():
        p.data = p.data.float()
    return model


# Qwen2-MoE: a dense layer and the shared expert in NF4; Mixtral: block_sparse_moe names, float32 routing
# weights (Qwen3-MoE differs from Qwen2-MoE only in attention, covered by tests/engine/test_moe_families.py).
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_4bit_moe_through_unsloth_equals_transformers_on_the_same_weights(tmp_path: Path, family: str) -> None:
    folder = write_4bit(tmp_path, family)
    llm = LLM(str(folder), num_kv_blocks=64)
    model = llm.engine.loaded.model
    assert sum(getattr(m, "is_quantized", False) for m in model.modules()) >= 4  # attention in NF4
    assert all(not m.is_quantized for m in model.modules() if isinstance(m, Experts))  # bnb left them 16-bit
    ours = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    del llm
    reference = load_hf_with_unsloth(folder, 512)
    if family != "mixtral":
        # Unsloth's CPU Mixtral keeps embeddings, norms and router in the checkpoint's bfloat16, so its
        # logits part from a float32 run by more than a rounding tie; the Qwen ones compare directly.
        for p, o in zip(PROMPTS, ours, strict=True):
            compare_greedy(reference, p, o, 0.05)  # raises where we part from it other than at a tie
    exact = dequantized_in_place(reference)
    for p, o in zip(PROMPTS, ours, strict=True):
        ref = exact.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist()
        assert o == ref, family
