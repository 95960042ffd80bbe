"""gpt-oss 4-bit checkpoints through Unsloth on the CPU: written by transformers + bitsandbytes (the
attention projections in NF4, the 3-D experts, router and sinks left in 16-bit), every tensor on disk
is read, and the greedy tokens equal Unsloth's own model computing with exactly the same weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from test_moe_4bit import dequantized_in_place
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from server import LLM, SamplingParams
from server.loader import DEMO_MODEL
from server.loader.unsloth import load_hf_with_unsloth
from server.models.gpt_oss_experts import GptOssExperts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_gpt_oss import make_model  # the tiny random gpt-oss

PROMPTS = [[5, 17, 99, 200, 3], list(range(10, 40))]  # the second is longer than the sliding window


def test_4bit_gpt_oss_through_unsloth_equals_unsloth_on_the_same_weights(tmp_path: Path) -> None:
    folder, _ = make_model(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "4bit")
    AutoTokenizer.from_pretrained(str(DEMO_MODEL)).save_pretrained(tmp_path / "4bit")
    llm = LLM(str(tmp_path / "4bit"), num_kv_blocks=64)
    ours_model = llm.engine.loaded.model
    assert sum(getattr(m, "is_quantized", False) for m in ours_model.modules()) >= 8  # q|k|v and o of 4 layers
    assert all(not m.is_quantized for m in ours_model.modules() if isinstance(m, GptOssExperts))
    ours = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    del llm
    exact = dequantized_in_place(load_hf_with_unsloth(tmp_path / "4bit", 512))
    for p, o in zip(PROMPTS, ours, strict=True):
        ref = exact.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist()
        assert o == ref
