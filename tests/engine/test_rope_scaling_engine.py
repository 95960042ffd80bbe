"""Our engine's logits equal transformers' (float32, CPU) on tiny random models with YaRN, longrope and
dynamic NTK RoPE, and Ministral 3 (YaRN and a query scale growing with the position, on our Llama
path), at positions past the original context: chunked prefill, paged decode, and a
prefix cache shared between a short and a long longrope prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams

ORIG = 32  # the original (pre-scaling) context of every model here
COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.3, eos_token_id=1)
HALF = 64 // 4 // 2
MODELS: dict[str, tuple[Any, dict[str, Any]]] = {
    "yarn-llama": (transformers.LlamaConfig, dict(max_position_embeddings=ORIG, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG, "beta_fast": 8.0})),
    "longrope-qwen2": (transformers.Qwen2Config, dict(max_position_embeddings=4 * ORIG, rope_scaling={
        "rope_type": "longrope", "original_max_position_embeddings": ORIG,
        "short_factor": [1.0 + 0.1 * i for i in range(HALF)], "long_factor": [1.0 + 3.0 * i for i in range(HALF)]})),
    "dynamic-llama": (transformers.LlamaConfig, dict(max_position_embeddings=ORIG, rope_scaling={
        "rope_type": "dynamic", "factor": 3.0})),
    # YaRN, and queries scaled by 1 + beta * log(1 + floor(position / ORIG)) (Llama 4's temperature)
    "yarn-ministral3": (transformers.Ministral3Config, dict(head_dim=16, max_position_embeddings=4 * ORIG,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                         "original_max_position_embeddings": ORIG, "beta_fast": 8.0,
                                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                         "llama_4_scaling_beta": 0.5})),
}
STEPS = 6


def make_model(tmp: Path, name: str) -> tuple[Path, torch.nn.Module]:
    config_cls, extra = MODELS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra),
                                                          attn_implementation="eager").eval()
    folder = tmp / name
    model.save_pretrained(folder)
    return folder, model


def engine_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """The logits each step of one greedy request samples from, [STEPS, vocab]."""
    seen: list[torch.Tensor] = []
    model = engine.runner.model
    compute = model.compute_logits

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        logits = compute(*args, **kwargs)
        seen.append(logits.detach().clone())
        return logits

    model.compute_logits = recording
    try:
        engine.add_request(str(len(prompt)), prompt, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
        while engine.has_unfinished_requests:
            engine.step()
    finally:
        del model.compute_logits
    return torch.cat(seen)


def hf_logits(hf: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return torch.cat(out.logits).float()


# (model, prompt lengths): each prompt runs alone in one engine, in this order.
CASES = {
    "yarn-llama": [75],  # served to ORIG x factor
    # Short prompt (short factors, long ones once decoding passes ORIG), then a long one sharing
    # its first blocks: transformers rotates a long prompt with the long factors throughout.
    "longrope-qwen2": [29, 70],
    # Decoding past max_position_embeddings: transformers rescales the base for each new length.
    "dynamic-llama": [28],
    "yarn-ministral3": [75],  # up to position 80: queries scaled by up to 1 + 0.5 * log(3)
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_logits_equal_transformers_past_the_original_context(tmp_path: Path, name: str) -> None:
    folder, hf = make_model(tmp_path, name)
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", dtype="float32", device="cpu",
                              num_kv_blocks=64, block_size=8, max_num_batched_tokens=24))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 384, (max(CASES[name]),), generator=gen).tolist()
    if name == "yarn-ministral3":  # served natively, its query scale read from the rope parameters
        assert engine.loaded.model.config.attn_temperature == (0.5, ORIG)  # type: ignore[union-attr]
    for n in CASES[name]:
        prompt = tokens[:n]
        ours, ref = engine_logits(engine, prompt), hf_logits(hf, prompt)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4, msg=lambda m, n=n: f"{name} prompt {n}: {m}")
    assert engine.block_manager.num_free_blocks == 64
