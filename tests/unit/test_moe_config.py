"""config.json of the mixture-of-experts families as published (Qwen3-30B-A3B, Qwen1.5-MoE-A2.7B and
Mixtral-8x7B keys) becomes the right ModelConfig; start-up checks accept them before torch is imported
and refuse a malformed one with what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sloth_serve.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False)
QWEN3_MOE = dict(BASE, architectures=["Qwen3MoeForCausalLM"], intermediate_size=192, head_dim=32, num_experts=128,
                 num_experts_per_tok=8, moe_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=1,
                 mlp_only_layers=[], rope_theta=1e6)
QWEN2_MOE = dict(BASE, architectures=["Qwen2MoeForCausalLM"], intermediate_size=160, num_experts=60,
                 num_experts_per_tok=4, moe_intermediate_size=32, shared_expert_intermediate_size=128,
                 norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[3])
MIXTRAL = dict(BASE, architectures=["MixtralForCausalLM"], intermediate_size=224, num_local_experts=8,
               num_experts_per_tok=2, sliding_window=None, rope_theta=1e6)


def test_qwen3_moe_fields() -> None:
    cfg = ModelConfig.from_dict(QWEN3_MOE)
    assert (cfg.family, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == ("qwen3_moe", 128, 8, 48)
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.norm_topk_prob and cfg.shared_expert_intermediate_size == 0
    assert all(cfg.is_moe_layer(i) for i in range(4)) and not cfg.router_weights_fp32


def test_qwen2_moe_shared_expert_bias_and_dense_layers() -> None:
    cfg = ModelConfig.from_dict(QWEN2_MOE)
    assert cfg.qkv_bias and not cfg.qk_norm and not cfg.norm_topk_prob
    assert cfg.shared_expert_intermediate_size == 128 and cfg.intermediate_size == 160
    # decoder_sparse_step 2: layers 1 and 3 sparse, but layer 3 is listed in mlp_only_layers
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, False]


def test_mixtral_experts_are_intermediate_size_wide_and_renormalized() -> None:
    cfg = ModelConfig.from_dict(MIXTRAL)
    assert (cfg.family, cfg.num_experts, cfg.moe_intermediate_size) == ("mixtral", 8, 224)
    assert cfg.norm_topk_prob and cfg.router_weights_fp32 and cfg.sliding_window is None


@pytest.mark.parametrize(("change", "message"), [
    (dict(num_experts_per_tok=9, num_local_experts=8), "num_experts_per_tok must be between 1 and num_experts"),
    (dict(num_local_experts=0), "num_experts must be a whole number"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
])
def test_malformed_moe_config_refused_with_reason(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(dict(MIXTRAL, **change))


def test_start_up_check_accepts_moe_families_before_torch(tmp_path: Path) -> None:
    folders = []
    for name, cfg in (("q3", QWEN3_MOE), ("q2", QWEN2_MOE), ("mx", MIXTRAL)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "model.safetensors").write_bytes(b"")
        (folder / "tokenizer_config.json").write_text("{}")
        folders.append(str(folder))
    code = ("import sys; from sloth_serve.preflight import check_model\n"
            f"for f in {folders!r}: print(check_model(f, 'unsloth'))\n"
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM"):
        assert arch in out.stdout
    assert "torch imported: False" in out.stdout
