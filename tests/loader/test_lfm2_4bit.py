"""LFM2 through the 4-bit Unsloth path: its convolution, attention and feed-forward projections are
adopted in NF4 (never made dense) and our greedy tokens equal Unsloth's `for_inference` model's."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from quant_formats import compare_greedy

from server import LLM, SamplingParams
from server.loader import DEMO_MODEL
from server.loader.unsloth import load_hf_with_unsloth
from server.models.layers import LoRALinear


def write_lfm2(folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.Lfm2Config(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, block_multiple_of=64,
                                  layer_types=["conv", "full_attention", "conv"], max_position_embeddings=512,
                                  initializer_range=0.1, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # Unsloth loads one
        if (DEMO_MODEL / name).is_file():
            shutil.copy(DEMO_MODEL / name, folder / name)
    return folder


def test_4bit_greedy_equals_unsloth_for_inference(tmp_path: Path) -> None:
    folder = write_lfm2(tmp_path / "lfm2")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (5, 30)]
    llm = LLM(folder, num_kv_blocks=64, block_size=8, max_num_batched_tokens=16)  # --load-format unsloth
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    layer0, layer1 = llm.engine.loaded.model.model.layers[:2]
    for proj in (layer0.conv.in_proj, layer0.conv.out_proj, layer0.feed_forward.w1, layer1.self_attn.qkv_proj):
        assert isinstance(proj, LoRALinear) and proj.is_quantized
    del llm
    reference = load_hf_with_unsloth(folder, 512)
    verdicts = [compare_greedy(reference, p, o, 0.25) for p, o in zip(prompts, ours, strict=True)]
    assert verdicts.count("exact") >= len(verdicts) - 1, verdicts  # one near tie at most
