"""Our forward pass equals transformers on tiny random models of each supported family (qkv bias,
q/k norm, sliding window, llama3 rope scaling, GQA), through chunked prefill and paged decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams

COMMON = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, eos_token_id=1,
)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama3-rope": (transformers.LlamaConfig, dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24)),
    # NoPE on layer 2 of 2, which attends through a sliding window; q/k/v/o biases
    "smollm3": (transformers.SmolLM3Config, dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=8,
                                                 attention_bias=True, pad_token_id=None, bos_token_id=None)),
}


def make_model(tmp: Path, family: str) -> tuple[Path, torch.nn.Module]:
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = config_cls(**COMMON, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # random biases and norms so that those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp / family
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers(tmp_path: Path, family: str) -> None:
    folder, hf = make_model(tmp_path, family)
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8, max_num_batched_tokens=24))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 384, (n,), generator=gen).tolist() for n in (3, 19, 45, 8)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert got[str(i)] == ref, f"{family} prompt {i}"
    assert engine.block_manager.num_free_blocks == 64
