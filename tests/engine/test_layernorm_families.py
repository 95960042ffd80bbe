"""Cohere (`CohereForCausalLM`) and StableLM (`StableLmForCausalLM`) natively: greedy tokens equal
transformers' on tiny random models (LayerNorms in both forms, parallel and sequential blocks, Cohere's
float32 interleaved RoPE and logit scale, StableLM's partial rotary and q/k/v biases) through chunked
prefill, paged decode and a batch; a hot-swapped LoRA equals PEFT; configs with q/k LayerNorms take the
generic path; an adapter with its own LayerNorm weights is refused."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_glm_families import engine_greedy as glm_engine_greedy
from test_glm_families import hf_greedy

from sloth_serve.models.config import ModelConfig
from sloth_serve.models.layernorm import LayerNormForCausalLM

COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.3,
    eos_token_id=1,
    pad_token_id=0,
)
MODELS: dict[str, tuple[type, dict[str, Any]]] = {
    "cohere": (transformers.CohereConfig, dict(logit_scale=0.5, attention_bias=True)),
    "stablelm": (transformers.StableLmConfig, dict(use_qkv_bias=True)),
    "stablelm-parallel": (
        transformers.StableLmConfig,
        dict(use_parallel_residual=True, partial_rotary_factor=0.5),
    ),
}
PROMPT_LENGTHS = (3, 19, 45, 8)


def make_model(tmp: Path, name: str) -> tuple[Path, torch.nn.Module]:
    config_cls, extra = MODELS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config_cls(**COMMON, **extra), attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # random biases and norms so that those code paths matter
        for key, p in model.named_parameters():
            if key.endswith("bias") or "norm" in key:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp / name
    model.save_pretrained(folder)
    return folder, model


# The GLM tests' engine run and transformers reference, checking that the family's own model class serves.
engine_greedy = functools.partial(glm_engine_greedy, model_class=LayerNormForCausalLM)



def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_matches_transformers(tmp_path: Path, name: str, device: str = "cpu") -> None:
    folder, hf = make_model(tmp_path, name)
    ps = prompts()
    assert engine_greedy(folder, ps, device) == [hf_greedy(hf, p) for p in ps]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_triton_kernels_and_cuda_graphs_match_transformers(tmp_path: Path, name: str) -> None:
    test_greedy_matches_transformers(tmp_path, name, device="cuda")


def test_cohere_lora_hot_swapped_equals_peft(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    folder, hf = make_model(tmp_path, "cohere")
    torch.manual_seed(3)
    tuned = get_peft_model(
        hf,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]
        ),
    )
    with torch.no_grad():
        for key, p in tuned.named_parameters():
            if "lora_B" in key:
                p.normal_(0.0, 0.3)
    tuned.save_pretrained(str(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    want = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ps = prompts()[:2]
    got = engine_greedy(folder, ps, adapter=tmp_path / "adapter")
    assert got == [hf_greedy(want, p) for p in ps]
    with want.disable_adapter():
        assert got != [hf_greedy(want, p) for p in ps]


def test_configs_read_with_transformers_defaults() -> None:
    cohere = ModelConfig.from_dict({"architectures": ["CohereForCausalLM"]})
    ref = transformers.CohereConfig()
    assert (cohere.hidden_size, cohere.num_kv_heads, cohere.logit_scale, cohere.tie_word_embeddings) == (
        ref.hidden_size,
        ref.num_attention_heads,
        ref.logit_scale,
        True,
    )
    assert cohere.rope_interleaved and cohere.rope_fp32 and cohere.parallel_residual
    stablelm = ModelConfig.from_dict({"architectures": ["StableLmForCausalLM"]})
    assert stablelm.rotary_dim == 20 and stablelm.norm_kind == "layernorm" and not stablelm.parallel_residual
    with pytest.raises(ValueError, match=r"config.json hidden_act: 'gelu' is not supported for stablelm"):
        ModelConfig.from_dict({"architectures": ["StableLmForCausalLM"], "hidden_act": "gelu"})


def test_adapter_with_its_own_layernorm_is_refused(tmp_path: Path) -> None:
    """modules_to_save of a LayerNorm would be applied as an RMSNorm per adapter: refused, naming it."""
    folder, _ = make_model(tmp_path, "stablelm")
    adapter = tmp_path / "norm-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
                "modules_to_save": ["input_layernorm"],
                "task_type": "CAUSAL_LM",
            }
        )
    )
    key = "base_model.model.model.layers.0"
    save_file(
        {
            f"{key}.self_attn.q_proj.lora_A.weight": torch.randn(2, 64),
            f"{key}.self_attn.q_proj.lora_B.weight": torch.randn(64, 2),
            f"{key}.input_layernorm.weight": torch.randn(64),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"model.layers.0.input_layernorm \(a LayerNorm\)"):
        engine_greedy(folder, prompts()[:1], adapter=adapter)
