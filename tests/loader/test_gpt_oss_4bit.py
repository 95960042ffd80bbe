"""gpt-oss 4-bit checkpoints through Unsloth on the CPU, in both layouts: transformers + bitsandbytes
(the attention projections in NF4, the 3-D experts, router and sinks left in 16-bit) and Unsloth's
bnb-4bit layout (every expert its own NF4 linear, `gate_up_projs.N` / `down_projs.N`, the router as
`router.linear`). Every tensor on disk is read, and the greedy tokens equal Unsloth's own model
computing with exactly the same weights; a folder in Unsloth's layout that transformers' class would
load with random experts is refused by the tensor count, not served."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from test_moe_4bit import dequantized_in_place
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.unsloth import load_hf_with_unsloth
from sloth_serve.models.gpt_oss_experts import GptOssExperts

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


def write_unsloth_4bit(root: Path) -> Path:
    """Unsloth's bnb-4bit gpt-oss layout: the tiny model's experts saved per expert ([out, in] linears
    with biases) and its router as router.linear, then quantized on load by bitsandbytes inside
    Unsloth's per-expert classes and saved again (what its -bnb-4bit repositories hold)."""
    from safetensors.torch import load_file, save_file

    from sloth_serve.loader.gpt_oss_layout import unsloth_gpt_oss_classes

    folder, _ = make_model(root)
    per_expert: dict[str, torch.Tensor] = {}
    for name, value in load_file(str(folder / "model.safetensors")).items():
        if ".mlp.router." in name:
            per_expert[name.replace(".mlp.router.", ".mlp.router.linear.")] = value
        elif ".experts." in name:
            base, _, kind = name.rpartition(".experts.")
            for e in range(value.shape[0]):
                key = f"{base}.experts.{kind.removesuffix('_bias')}s.{e}"
                per_expert[f"{key}.bias" if kind.endswith("_bias") else f"{key}.weight"] = (
                    value[e] if kind.endswith("_bias") else value[e].t()).contiguous()
        else:
            per_expert[name] = value
    save_file(per_expert, str(folder / "model.safetensors"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    with unsloth_gpt_oss_classes(folder):
        model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, dtype=torch.bfloat16)
    model.save_pretrained(root / "unsloth-4bit")
    AutoTokenizer.from_pretrained(str(DEMO_MODEL)).save_pretrained(root / "unsloth-4bit")
    return root / "unsloth-4bit"


def test_unsloth_bnb_4bit_layout_keeps_experts_in_nf4_and_equals_unsloth(tmp_path: Path) -> None:
    folder = write_unsloth_4bit(tmp_path)
    llm = LLM(str(folder), num_kv_blocks=64)
    experts = [m for m in llm.engine.loaded.model.modules() if isinstance(m, GptOssExperts)]
    assert len(experts) == 4 and all(m.is_quantized and len(m.quant) == 12 for m in experts)  # 6 experts x 2
    ours = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    del llm
    exact = dequantized_in_place(load_hf_with_unsloth(folder, 512))
    for p, o in zip(PROMPTS, ours, strict=True):
        ref = exact.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist()
        assert o == ref
    # Without Unsloth's classes, transformers' own would leave the per-expert tensors unread (its 3-D
    # experts random): the load counts the tensors on disk and stops, whatever names the layouts share.
    with mock.patch("sloth_serve.loader.gpt_oss_layout.is_unsloth_gpt_oss_layout", return_value=False), \
            pytest.raises(ValueError, match=r"tensor\(s\) on disk were not loaded.*experts\.down_projs\.0"):
        LLM(str(folder), num_kv_blocks=64)


def test_3d_layout_turns_unsloths_per_expert_switch_off_for_the_load(tmp_path: Path) -> None:
    """A folder with transformers' 3-D experts is loaded with Unsloth's per-expert gpt-oss classes
    switched off (they would leave the 3-D tensors unread), and the switch is as before afterwards."""
    import os

    from sloth_serve.loader.gpt_oss_layout import DISABLE, unsloth_gpt_oss_classes

    folder, _ = make_model(tmp_path)
    os.environ.pop(DISABLE, None)
    with unsloth_gpt_oss_classes(folder):
        assert os.environ.get(DISABLE) == "1"
    assert DISABLE not in os.environ
    with unsloth_gpt_oss_classes(DEMO_MODEL):  # not gpt-oss: nothing changes
        assert DISABLE not in os.environ
