"""The Mamba-2 hybrids (Granite 4 hybrid, Falcon-H1) through the 4-bit Unsloth path: the mixers'
in_proj / out_proj, attention and MLP projections are adopted in NF4 (never made dense), the SSM state
is float32 beside 16-bit activations, and our greedy tokens equal Unsloth's `for_inference` model's."""

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
                  max_position_embeddings=512, initializer_range=0.1, eos_token_id=2, pad_token_id=0, bos_token_id=1,
                  mamba_n_heads=8, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4)
    if family == "granitemoehybrid":
        return transformers.GraniteMoeHybridConfig(**common, intermediate_size=64, shared_intermediate_size=256,
                                                   num_hidden_layers=2, layer_types=["mamba", "attention"],
                                                   num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5,
                                                   embedding_multiplier=4.0, logits_scaling=2.0)
    return transformers.FalconH1Config(**common, intermediate_size=256, num_hidden_layers=2, mamba_d_ssm=256,
                                       mamba_rms_norm=True, key_multiplier=0.5, ssm_multipliers=[1.0, 0.5, 1.0, 1.0, 2.0])


def write_model(folder: Path, family: str) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(family), attn_implementation="eager").eval()
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # Unsloth loads one
        if (DEMO_MODEL / name).is_file():
            shutil.copy(DEMO_MODEL / name, folder / name)
    return folder


@pytest.mark.parametrize("family", ["granitemoehybrid", "falcon_h1"])
def test_4bit_greedy_equals_unsloth_for_inference(tmp_path: Path, family: str) -> None:
    folder = write_model(tmp_path / family, family)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (5, 30)]
    llm = LLM(folder, num_kv_blocks=64, block_size=8, max_num_batched_tokens=16)  # --load-format unsloth
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    layer0, layer1 = llm.engine.loaded.model.model.layers[:2]
    projections = [layer0.mamba.in_proj, layer0.mamba.out_proj, layer1.self_attn.qkv_proj]
    projections += ([layer0.shared_mlp.input_linear] if family == "granitemoehybrid"
                    else [layer0.feed_forward.gate_up_proj, layer1.self_attn.o_proj])
    for proj in projections:
        assert isinstance(proj, LoRALinear) and proj.is_quantized
    for conv, ssm in llm.engine.loaded.model.mamba_states:  # inputs in the activation dtype, the SSM state float32
        assert conv.dtype == llm.engine.dtype and ssm.dtype == torch.float32
    del llm
    reference = load_hf_with_unsloth(folder, 512)
    verdicts = [compare_greedy(reference, p, o, 0.25) for p, o in zip(prompts, ours, strict=True)]
    assert verdicts.count("exact") >= len(verdicts) - 1, verdicts  # one near tie at most
