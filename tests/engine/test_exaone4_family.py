"""EXAONE 4.0 (`Exaone4ForCausalLM`) natively: greedy tokens equal transformers' on tiny random models
(q/k norms, norms after attention and MLP, sliding-window layers with RoPE and global layers without,
prompts longer than the window; and a model without a window, every layer global and rotated) through
chunked prefill, paged decode and a batch; a hot-swapped LoRA with its own norms equals PEFT."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_glm_families import engine_greedy as glm_engine_greedy
from test_glm_families import hf_greedy

from sloth_serve.models.config import ModelConfig
from sloth_serve.models.exaone4 import Exaone4ForCausalLM

COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.3,
    eos_token_id=1,
    pad_token_id=0,
)
MODELS: dict[str, dict[str, Any]] = {
    "hybrid": dict(sliding_window=8, sliding_window_pattern=2),
    "global": dict(sliding_window=None, layer_types=["full_attention"] * 4),
}
PROMPT_LENGTHS = (3, 19, 45, 8)


def make_model(tmp: Path, name: str) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Exaone4Config(**COMMON, **MODELS[name]), attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # random norms so that those code paths matter
        for key, p in model.named_parameters():
            if "norm" in key:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp / name
    model.save_pretrained(folder)
    return folder, model


# The GLM tests' engine run and transformers reference, checking that the family's own model class serves.
engine_greedy = functools.partial(glm_engine_greedy, model_class=Exaone4ForCausalLM)



def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_matches_transformers(tmp_path: Path, name: str, device: str = "cpu") -> None:
    folder, hf = make_model(tmp_path, name)
    cfg = ModelConfig.from_folder(folder)
    if name == "hybrid":
        assert cfg.layer_windows == (8, None, 8, None) and cfg.rope_layers == (True, False, True, False)
    else:
        assert cfg.layer_windows == (None,) * 4 and cfg.rope_layers == (True,) * 4
    ps = prompts()
    assert engine_greedy(folder, ps, device) == [hf_greedy(hf, p) for p in ps]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_triton_kernels_and_cuda_graphs_match_transformers(tmp_path: Path, name: str) -> None:
    test_greedy_matches_transformers(tmp_path, name, device="cuda")


def test_lora_with_its_own_norms_hot_swapped_equals_peft(tmp_path: Path) -> None:
    """LoRA on q/v and the MLP, with its own post-attention / post-feed-forward norms (modules_to_save)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    folder, hf = make_model(tmp_path, "hybrid")
    torch.manual_seed(3)
    tuned = get_peft_model(
        hf,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
            modules_to_save=["post_attention_layernorm", "post_feedforward_layernorm"],
        ),
    )
    with torch.no_grad():
        for key, p in tuned.named_parameters():
            if "lora_B" in key or "modules_to_save" in key:
                p.add_(torch.randn_like(p) * 0.3)
    tuned.save_pretrained(str(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    want = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ps = prompts()[:2]
    got = engine_greedy(folder, ps, adapter=tmp_path / "adapter")
    assert got == [hf_greedy(want, p) for p in ps]
    with want.disable_adapter():
        assert got != [hf_greedy(want, p) for p in ps]


def test_config_defaults_are_transformers() -> None:
    cfg = ModelConfig.from_dict({"architectures": ["Exaone4ForCausalLM"]})
    assert cfg.layer_windows == tuple(None if (i + 1) % 4 == 0 else 4096 for i in range(32))
    assert cfg.rope_layers == tuple((i + 1) % 4 != 0 for i in range(32)) and cfg.qk_norm
    with pytest.raises(ValueError, match=r"config.json sliding_window_pattern: 'LLLG' without layer_types"):
        ModelConfig.from_dict({"architectures": ["Exaone4ForCausalLM"], "sliding_window_pattern": "LLLG"})
