"""Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`: q|k|v and gate|up fused on disk, partial rotary,
longrope, sliding window) served natively: our greedy tokens equal transformers' on tiny random models
through chunked prefill and paged decode, and the config is read as transformers' Phi3Config reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from phi3_models import write_phi3
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from sloth_kernels.rope import rope_tables
from sloth_kernels.rope_scaling import rope_rows
from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.models.config import ModelConfig
from sloth_serve.models.layers import LoRALinear
from sloth_serve.preflight import StartupError, check_model

ORIG = 32  # the original context of the longrope models
COMMON: dict[str, Any] = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, initializer_range=0.3, eos_token_id=1, pad_token_id=0, bos_token_id=2,
)


def longrope(rotary_dim: int) -> dict[str, Any]:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.0 + 3.0 * i for i in range(half)]}


MODELS: dict[str, dict[str, Any]] = {
    # Phi-3-mini-4k: full rotary, no scaling, a sliding window (2047 there), separate lm_head
    "phi3-mini": dict(max_position_embeddings=128, sliding_window=12, tie_word_embeddings=False),
    # Phi-3.5-mini: full rotary with longrope
    "phi3.5-longrope": dict(max_position_embeddings=4 * ORIG, original_max_position_embeddings=ORIG,
                            rope_scaling=longrope(16), tie_word_embeddings=False),
    # Phi-4-mini: 3/4 of each head rotated, longrope over those dims, tied embeddings
    "phi4-mini": dict(max_position_embeddings=4 * ORIG, original_max_position_embeddings=ORIG,
                      partial_rotary_factor=0.75, rope_scaling=longrope(12), tie_word_embeddings=True),
}


def make_phi3(folder: Path, name: str, **overrides: Any) -> torch.nn.Module:
    """A random Phi3ForCausalLM saved to `folder` (random norms too, so their code paths matter)."""
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(**{**COMMON, **MODELS[name], **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return model


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return [got[str(i)] for i in range(len(prompts))]


def hf_greedy(hf: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


# Prompt lengths: short ones stay below ORIG while decoding (short factors), 45 is past it from the
# start (long factors for every token), 19 and 45 outgrow the 12-token window of phi3-mini.
PROMPT_LENGTHS = (3, 19, 45, 8)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_matches_transformers(tmp_path: Path, name: str, device: str = "cpu") -> None:
    hf = make_phi3(tmp_path / name, name)
    engine = LLMEngine(Config(model=str(tmp_path / name), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=24, device=device, dtype="float32", cuda_graph_sizes=(1, 2, 4)))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    got = engine_greedy(engine, prompts, 10)
    for i, p in enumerate(prompts):
        assert got[i] == hf_greedy(hf, p, 10), f"{name} prompt {i} ({len(p)} tokens)"
    assert engine.block_manager.num_free_blocks == 64
    qkv = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, LoRALinear) and qkv.out_slices == [64, 32, 32]  # the fused tensor, in its slices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_triton_kernels_and_cuda_graphs_match_transformers(tmp_path: Path, name: str) -> None:
    """The same on CUDA in float32: Triton RoPE over the rotary dims, windowed paged attention, decode
    steps replayed from CUDA graphs."""
    test_greedy_matches_transformers(tmp_path, name, device="cuda")


# What the published configs hold (Phi-4-mini-instruct, Phi-3-mini-4k-instruct, an early Phi-3-mini-128k
# with rope type "su"), shortened: every key our reading depends on.
PUBLISHED: dict[str, dict[str, Any]] = {
    "phi4-mini": dict(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75,
                      max_position_embeddings=131072, original_max_position_embeddings=4096, sliding_window=262144,
                      rope_theta=10000.0, tie_word_embeddings=True, rope_scaling={
                          "type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(48)],
                          "long_factor": [1.0 + 0.5 * i for i in range(48)]}),
    "phi3-mini-4k": dict(hidden_size=3072, num_attention_heads=32, max_position_embeddings=4096,
                         original_max_position_embeddings=4096, sliding_window=2047, rope_scaling=None),
    "phi3-mini-128k-su": dict(hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
                              original_max_position_embeddings=4096, sliding_window=262144, rope_scaling={
                                  "type": "su", "short_factor": [1.05] * 48, "long_factor": [1.0 + i for i in range(48)]}),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_read_as_transformers_reads_it(name: str) -> None:
    raw = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 1000, "intermediate_size": 256,
           "num_hidden_layers": 2, **PUBLISHED[name]}
    ours = ModelConfig.from_dict(raw)
    kwargs = {k: v for k, v in raw.items() if k != "architectures"}
    if (kwargs.get("rope_scaling") or {}).get("type") == "su":  # transformers 5 no longer reads this old name
        kwargs["rope_scaling"] = {**kwargs["rope_scaling"], "type": "longrope"}
    theirs = transformers.Phi3Config(**kwargs)
    assert ours.family == "phi3" and ours.sliding_window == theirs.sliding_window
    assert ours.rms_norm_eps == theirs.rms_norm_eps and ours.num_kv_heads == theirs.num_key_value_heads
    rotary = Phi3RotaryEmbedding(theirs)
    assert ours.rotary_dim == 2 * rotary.inv_freq.numel()
    cos, sin = rope_tables(ours.rotary_dim, ours.rope_theta, ours.rope_scaling, 8192)
    x = torch.zeros(1, 1, dtype=torch.float32)
    for positions in ([5, 4095], [5, 4096]):  # the whole sequence fits the original context, then does not
        ref_cos, ref_sin = rotary(x, torch.tensor([positions]))
        # the rows a prompt as long as the last position + 1 reads (transformers: one factor set for all)
        rows = rope_rows(ours.rope_scaling, 8192, positions[1] + 1, 0, positions[1] + 1)
        half = ours.rotary_dim // 2
        for j, p in enumerate(positions):
            torch.testing.assert_close(cos[rows[p]], ref_cos[0, j, :half], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sin[rows[p]], ref_sin[0, j, :half], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("change", "field"), [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type"),
    (dict(partial_rotary_factor=0.75, rope_scaling={"type": "longrope", "short_factor": [1.0] * 16,
                                                    "long_factor": [1.0] * 16}), "short_factor"),
])
def test_config_refusals_name_the_field(change: dict[str, Any], field: str) -> None:
    raw = {"architectures": ["Phi3ForCausalLM"], **COMMON, "max_position_embeddings": 128, **change}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(raw)


def test_start_up_checks_accept_a_phi3_folder_and_refuse_a_bad_one(tmp_path: Path) -> None:
    folder = write_phi3(tmp_path / "phi4-mini", "phi4-mini")
    assert check_model(str(folder), "unsloth").endswith("Phi3ForCausalLM, 16-bit")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}))
    with pytest.raises(StartupError, match="'dynamic' is not a Phi-3 RoPE type"):
        check_model(str(folder), "unsloth")
