"""Our RoPE tables equal transformers' rotary embedding (LlamaRotaryEmbedding, attention factor
included) for YaRN, longrope and dynamic NTK at positions past the original context, read from the
config.json transformers writes; unsupported settings are refused naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from sloth_kernels.rope import rope_inv_freq, rope_tables
from sloth_kernels.rope_scaling import rope_rows
from sloth_serve.models.config import ModelConfig

HEAD_DIM = 32
ORIG = 64
BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=256, rope_theta=10000.0)
SHORT = [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)]
LONG = [1.5 + 0.4 * i for i in range(HEAD_DIM // 2)]
YARN = {
    "qwen": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG},
    "gpt-oss": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": ORIG, "beta_fast": 32.0,
                "beta_slow": 1.0, "truncate": False},
    "mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": ORIG, "mscale": 0.707,
               "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
    "mscale-ratio": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIG, "mscale": 1.0,
                     "mscale_all_dim": 0.5},
    "attention-factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                         "attention_factor": 0.8},
}


def configs(rope: dict[str, Any], **extra: Any) -> tuple[transformers.LlamaConfig, ModelConfig]:
    """transformers' config and ours, read back from the config.json transformers writes."""
    hf = transformers.LlamaConfig(**BASE, rope_scaling=dict(rope), **extra)
    return hf, ModelConfig.from_dict(json.loads(hf.to_json_string()))


def tables(ours: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables(ours.head_dim, ours.rope_theta, ours.rope_scaling, ours.max_position_embeddings)


def hf_cos_sin(rot: LlamaRotaryEmbedding, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin for one forward pass over `positions` (its first half: the halves repeat)."""
    cos, sin = rot(torch.zeros(1), torch.tensor([positions]))
    return cos[0, :, : HEAD_DIM // 2], sin[0, :, : HEAD_DIM // 2]


def assert_rows_equal(ours: tuple[torch.Tensor, torch.Tensor], rows: list[int] | range,
                      ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    idx = torch.tensor(list(rows))
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine[idx], theirs, atol=1e-6, rtol=0)  # one-ulp flips at most


@pytest.mark.parametrize("name", sorted(YARN))
def test_yarn_tables_equal_transformers_past_the_original_context(name: str) -> None:
    hf, ours = configs(YARN[name])
    rot = LlamaRotaryEmbedding(hf)
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS["yarn"](hf)
    torch.testing.assert_close(rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling), inv_ref, atol=0, rtol=1e-6)
    cos, sin = tables(ours)
    # YaRN serves the context it was scaled to (original length x factor), at least the config's.
    assert ours.max_position_embeddings == max(256, int(ORIG * YARN[name]["factor"]))
    positions = [*range(0, 200, 7), ORIG, 255, ours.max_position_embeddings - 1]
    assert_rows_equal((cos, sin), positions, hf_cos_sin(rot, positions))
    assert cos[0, 0].item() == pytest.approx(factor_ref)  # cos(0) carries the attention factor alone


def test_yarn_legacy_rope_scaling_key_reads_like_transformers() -> None:
    raw = {**BASE, "architectures": ["Qwen2ForCausalLM"], "rope_scaling": {"type": "yarn", "factor": 4.0,
           "original_max_position_embeddings": ORIG}}
    ours = ModelConfig.from_dict(raw)
    hf = transformers.LlamaConfig(**{**BASE, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": ORIG}})
    assert_rows_equal(tables(ours), range(256), hf_cos_sin(LlamaRotaryEmbedding(hf), list(range(256))))


def longrope_config(**rope: Any) -> tuple[transformers.LlamaConfig, ModelConfig]:
    return configs({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, **rope},
                   original_max_position_embeddings=ORIG)


def test_longrope_prompt_longer_than_original_context_uses_long_factors_throughout() -> None:
    hf, ours = longrope_config()
    cos, sin = tables(ours)
    length = 150  # > ORIG: transformers takes the long factors for every position of this pass
    rows = rope_rows(ours.rope_scaling, ours.max_position_embeddings, length, 0, length)
    assert_rows_equal((cos, sin), rows, hf_cos_sin(LlamaRotaryEmbedding(hf), list(range(length))))
    # The same prompt prefilled in chunks reads the same rows.
    chunks = [*rope_rows(ours.rope_scaling, 256, length, 0, 40), *rope_rows(ours.rope_scaling, 256, length, 40, length)]
    assert chunks == list(rows)


def test_longrope_short_sequence_and_decoded_positions_equal_transformers() -> None:
    hf, ours = longrope_config()
    rot = LlamaRotaryEmbedding(hf)
    cos, sin = tables(ours)
    short = list(range(ORIG))  # fits the original context: short factors
    assert_rows_equal((cos, sin), rope_rows(ours.rope_scaling, 256, ORIG, 0, ORIG), hf_cos_sin(rot, short))
    for p in (ORIG - 1, ORIG, ORIG + 1, 200, 255):  # one token decoded at p: sequence length p + 1
        assert_rows_equal((cos, sin), rope_rows(ours.rope_scaling, 256, 10, p, p + 1), hf_cos_sin(rot, [p]))


def test_longrope_attention_factor_and_original_length_resolve_like_transformers() -> None:
    # Phi-3 style: no `factor`, the top-level original length wins over the one in the dict.
    hf, ours = longrope_config(original_max_position_embeddings=128)
    assert ours.rope_scaling is not None
    assert ours.rope_scaling["original_max_position_embeddings"] == ORIG
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS["longrope"](hf)
    assert factor_ref == pytest.approx((1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(64.0))).sqrt().item())
    torch.testing.assert_close(rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling), inv_ref, atol=0, rtol=1e-6)
    assert tables(ours)[0][0, 0].item() == pytest.approx(factor_ref)
    # `su`, the name early Phi-3 configs used, reads as longrope.
    su = ModelConfig.from_dict({**BASE, "original_max_position_embeddings": ORIG, "rope_scaling": {
        "type": "su", "short_factor": SHORT, "long_factor": LONG}})
    assert su.rope_scaling == ours.rope_scaling


def test_dynamic_ntk_equals_transformers_within_and_past_the_original_length() -> None:
    hf, ours = configs({"rope_type": "dynamic", "factor": 2.0})
    assert ours.max_position_embeddings == 512  # served up to factor x max_position_embeddings
    cos, sin = tables(ours)
    rot = LlamaRotaryEmbedding(hf)
    within = list(range(256))  # transformers does not rescale while the sequence fits
    assert_rows_equal((cos, sin), within, hf_cos_sin(rot, within))
    for p in (256, 257, 300, 511):  # decoded one at a time, growing: the base for length p + 1
        assert_rows_equal((cos, sin), [p], hf_cos_sin(rot, [p]))


def test_dynamic_ntk_long_prompt_differs_from_transformers_as_documented() -> None:
    # transformers rotates a whole prompt longer than max_position_embeddings with the base for
    # its length; a paged cache keeps keys rotated per position (README: RoPE scaling).
    hf, ours = configs({"rope_type": "dynamic", "factor": 2.0})
    ref = hf_cos_sin(LlamaRotaryEmbedding(hf), list(range(400)))
    assert not torch.allclose(tables(ours)[0][:400], ref[0], atol=1e-3)


@pytest.mark.parametrize("rope, field", [
    ({"rope_type": "proportional", "factor": 2.0}, "rope_type"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": LONG, "original_max_position_embeddings": 8},
     "short_factor"),
    ({"rope_type": "dynamic"}, "factor"),
    ({"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_rope_settings_are_refused_naming_the_field(rope: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**BASE, "rope_scaling": rope})
