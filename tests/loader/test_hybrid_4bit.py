"""The hybrid families (LFM2, Qwen3.5) through the 4-bit Unsloth path: their convolution / Gated
DeltaNet, attention and feed-forward projections are adopted in NF4 (never made dense) and our greedy
tokens equal Unsloth's `for_inference` model's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from quant_formats import compare_greedy

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.unsloth import load_hf_with_unsloth
from sloth_serve.models.layers import LoRALinear


def config(family: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=4096, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, initializer_range=0.1, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    if family == "lfm2":
        return transformers.Lfm2Config(**common, intermediate_size=384, num_hidden_layers=3, block_multiple_of=64,
                                       layer_types=["conv", "full_attention", "conv"])
    cfg = transformers.Qwen3_5TextConfig(**common, intermediate_size=256, num_hidden_layers=2, head_dim=32,
                                         linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                                         linear_value_head_dim=32, layer_types=["linear_attention", "full_attention"])
    cfg.architectures = ["Qwen3_5ForCausalLM"]
    return cfg


def write_model(folder: Path, family: str) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(family), attn_implementation="eager").eval()
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # Unsloth loads one
        if (DEMO_MODEL / name).is_file():
            shutil.copy(DEMO_MODEL / name, folder / name)
    return folder


@pytest.mark.parametrize("family", ["lfm2", "qwen3_5"])
def test_4bit_greedy_equals_unsloth_for_inference(tmp_path: Path, family: str) -> None:
    folder = write_model(tmp_path / family, family)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (5, 30)]
    llm = LLM(folder, num_kv_blocks=64, block_size=8, max_num_batched_tokens=16)  # --load-format unsloth
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    layer0, layer1 = llm.engine.loaded.model.model.layers[:2]
    if family == "lfm2":
        projections = [layer0.conv.in_proj, layer0.conv.out_proj, layer0.feed_forward.w1, layer1.self_attn.qkv_proj]
    else:
        gdn = layer0.linear_attn
        projections = [gdn.in_proj_qkv, gdn.in_proj_z, gdn.in_proj_b, gdn.out_proj, layer1.self_attn.qkv_proj]
    for proj in projections:
        assert isinstance(proj, LoRALinear) and proj.is_quantized
    del llm
    reference = load_hf_with_unsloth(folder, 512)
    verdicts = [compare_greedy(reference, p, o, 0.25) for p, o in zip(prompts, ours, strict=True)]
    assert verdicts.count("exact") >= len(verdicts) - 1, verdicts  # one near tie at most
