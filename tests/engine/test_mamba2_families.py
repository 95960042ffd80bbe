"""Granite 4 hybrid (GraniteMoeHybridForCausalLM) and Falcon-H1 (FalconH1ForCausalLM), Mamba-2 + attention,
served natively with a conv and an SSM state per running sequence: our greedy tokens equal transformers'
on tiny random models (every multiplier, gate option, RoPE or none, MoE or dense) through one-pass
prefill, chunked prefill (both states carried across chunks) and preemption (the slot freed, the state
rebuilt by re-prefill) and a prefix-cache hit (the state snapshot restored); published configs read as
transformers reads them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_lfm2_family import check_prefix_hits

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.models.config import ModelConfig

VOCAB = 256
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mamba_n_groups=2,
    mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16, max_position_embeddings=256, eos_token_id=1,
    pad_token_id=0, bos_token_id=2, initializer_range=0.3,
)
GRANITE: dict[str, Any] = dict(
    intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=4, mamba_n_heads=8,
    layer_types=["mamba", "attention", "mamba", "mamba"], num_local_experts=4, num_experts_per_tok=2,
    embedding_multiplier=2.0, residual_multiplier=0.7, attention_multiplier=0.2, logits_scaling=1.5,
)
FALCON: dict[str, Any] = dict(
    intermediate_size=96, num_hidden_layers=3, head_dim=8, mamba_d_ssm=96, mamba_n_heads=6,
    ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9], mlp_multipliers=[0.7, 1.3], key_multiplier=0.6,
    attention_in_multiplier=0.9, attention_out_multiplier=1.1, ssm_in_multiplier=1.2, ssm_out_multiplier=0.8,
    embedding_multiplier=1.5, lm_head_multiplier=0.9,
)
VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "granite-moe-nope": (transformers.GraniteMoeHybridConfig, GRANITE),  # Granite-4.0-H: no RoPE
    "granite-dense-rope": (transformers.GraniteMoeHybridConfig,
                           {**GRANITE, "num_local_experts": 0, "position_embedding_type": "rope"}),
    "granite-attention-only": (transformers.GraniteMoeHybridConfig,  # granite-4.0-micro's kind: no state
                               {**GRANITE, "layer_types": ["attention"] * 4, "position_embedding_type": "rope"}),
    "falcon-h1-gate": (transformers.FalconH1Config, FALCON),  # y * silu(z), no norm (the config default)
    "falcon-h1-norm-first": (transformers.FalconH1Config, {**FALCON, "mamba_rms_norm": True}),
    "falcon-h1-gate-first": (transformers.FalconH1Config,
                             {**FALCON, "mamba_rms_norm": True, "mamba_norm_before_gate": False}),
}


def make_model(folder: Path, variant: str) -> torch.nn.Module:
    """A random model saved to `folder`; its norms, A_log, D and dt_bias randomized too."""
    torch.manual_seed(0)
    config_class, fields = VARIANTS[variant]
    hf = transformers.AutoModelForCausalLM.from_config(config_class(**{**COMMON, **fields}),
                                                       attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(("A_log", ".D", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return [got[str(i)] for i in range(len(prompts))]


_made: dict[str, tuple[Path, list[list[int]], list[list[int]]]] = {}
_hf: dict[str, torch.nn.Module] = {}


def made(variant: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]], list[list[int]]]:
    """The variant's folder, prompts and transformers' greedy tokens, made once per session."""
    if variant not in _made:
        folder = tmp_path_factory.mktemp(variant)
        hf = make_model(folder, variant)
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 21, 40, 1, 9)]
        want = [hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        _made[variant], _hf[variant] = (folder, prompts, want), hf
    return _made[variant]


# Every schedule on one model of each family; the other variants (gating, RoPE, dense, no Mamba) through
# chunked prefill, which runs every path of one pass too.
RUNS = [(v, run) for v in ("granite-moe-nope", "falcon-h1-norm-first") for run in ("one-pass", "chunked", "preempt")]
RUNS += [(v, "chunked") for v in VARIANTS if v not in ("granite-moe-nope", "falcon-h1-norm-first")]
SCHEDULES = {"one-pass": (512, 64), "chunked": (7, 64), "preempt": (16, 9)}  # token budget, KV blocks


@pytest.mark.parametrize(("variant", "schedule"), RUNS, ids=[f"{v}-{r}" for v, r in RUNS])
def test_greedy_matches_transformers(tmp_path_factory: pytest.TempPathFactory, variant: str, schedule: str,
                                     device: str = "cpu") -> None:
    folder, prompts, want = made(variant, tmp_path_factory)
    budget, blocks = SCHEDULES[schedule]
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=blocks, block_size=8,
                              max_num_batched_tokens=budget, max_num_seqs=8, device=device, dtype="float32",
                              cuda_graph_sizes=(1, 2, 4)))
    assert run_engine(engine, prompts, 12) == want
    if blocks == 9:
        assert engine.scheduler.num_preemptions > 0, "the tiny cache was meant to preempt"
    cfg = engine.runner.model.config
    slots = engine.block_manager.state_slots
    assert (slots is not None) == cfg.has_state and engine.block_manager.num_free_blocks == blocks
    assert slots is None or slots.num_used == 0
    if device == "cuda" and cfg.has_state:  # decode steps replayed CUDA graphs holding each row's state slots
        assert engine.runner.graphs is not None and engine.runner.graphs.scratch_state is not None
    # Granite: its one attention layer (all four without Mamba layers); Falcon-H1: every layer
    assert len(engine.runner.kv_caches) == len(cfg.kv_layers) == (3 if cfg.family == "falcon_h1" else
                                                                  1 if cfg.has_state else 4)


@pytest.mark.parametrize(("variant", "budget"), [("granite-moe-nope", 13), ("falcon-h1-norm-first", 512)])
def test_prefix_cache_hit_restores_the_state(tmp_path_factory: pytest.TempPathFactory, variant: str,
                                             budget: int) -> None:
    """A hit restores the KV blocks and a snapshot of every Mamba-2 layer's conv and SSM state taken
    where the cached prompt's last full block ended; the tokens still equal transformers' (as without
    the cache), in a chunked prefill (Granite) and one pass (Falcon-H1)."""
    folder = made(variant, tmp_path_factory)[0]
    check_prefix_hits(folder, _hf[variant], VOCAB, budget)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_triton_kernels_match_transformers(tmp_path_factory: pytest.TempPathFactory, variant: str,
                                           schedule: str) -> None:
    """The same on CUDA in float32 (Triton SSD, conv, gated norm, attention; decode in CUDA graphs)."""
    test_greedy_matches_transformers(tmp_path_factory, variant, schedule, device="cuda")


GRANITE_4_H_TINY = {  # ibm-granite/granite-4.0-h-tiny's config.json (the fields that shape the model)
    "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid", "hidden_size": 1536,
    "intermediate_size": 512, "shared_intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 12,
    "num_key_value_heads": 4, "num_local_experts": 64, "num_experts_per_tok": 6, "vocab_size": 100352,
    "layer_types": ["mamba", "mamba", "mamba", "attention"], "mamba_n_heads": 48, "mamba_d_head": 64,
    "mamba_n_groups": 1, "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
    "position_embedding_type": "nope", "attention_multiplier": 0.0078125, "embedding_multiplier": 12,
    "logits_scaling": 6, "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
    "time_step_limit": [0.0, float("inf")], "max_position_embeddings": 131072, "rope_theta": 10000,
}


def test_granite_4_config_read_as_transformers_reads_it() -> None:
    ours = ModelConfig.from_dict(GRANITE_4_H_TINY)
    theirs = transformers.GraniteMoeHybridConfig(**{k: v for k, v in GRANITE_4_H_TINY.items() if k != "architectures"})
    mixer = transformers.models.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer(theirs, 0)
    assert ours.mamba is not None and ours.multipliers is not None
    assert ours.mamba.conv_dim == mixer.conv_dim and ours.mamba.intermediate_size == mixer.intermediate_size
    assert ours.kv_layers == [3] and ours.has_state and not ours.rope_enabled
    assert ours.num_experts == 64 and ours.moe_intermediate_size == 512 and ours.intermediate_size == 1024
    assert ours.attn_scale == 0.0078125 and ours.multipliers.logits == 1 / 6 and ours.mamba.dt_max == float("inf")


def test_all_attention_granite_4_keeps_no_state() -> None:
    """granite-4.0-micro's kind: GraniteMoeHybrid with attention layers only, dense, RoPE."""
    raw = {**GRANITE_4_H_TINY, "layer_types": ["attention"] * 4, "num_local_experts": 0,
           "position_embedding_type": "rope"}
    ours = ModelConfig.from_dict(raw)
    assert ours.mamba is None and not ours.has_state and ours.kv_layers == [0, 1, 2, 3] and ours.rope_enabled


def test_falcon_h1_every_layer_keeps_kv_and_state() -> None:
    raw = {"architectures": ["FalconH1ForCausalLM"], "model_type": "falcon_h1", **COMMON, **FALCON}
    ours = ModelConfig.from_dict(raw)
    assert ours.kv_layers == [0, 1, 2] and ours.has_state and ours.head_dim == 8
    assert ours.mamba is not None and ours.mamba.head_dim == 16 and ours.mamba.zxbcdt_multipliers[1] == 1.5


@pytest.mark.parametrize("variant", ["falcon-h1-norm-first", "granite-moe-nope"])
def test_lora_on_mixer_attention_and_mlp_equals_peft(tmp_path: Path, variant: str) -> None:
    """LoRA on in_proj (under Falcon-H1's input and section multipliers), q / k / v (its key multiplier),
    the MLPs (PEFT refuses the mixer's out_proj): our greedy tokens with the adapter equal PEFT's and
    differ from the base's."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from sloth_serve import LLM

    hf = make_model(tmp_path / "base", variant)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # LLM loads a tokenizer; prompts are token ids
        shutil.copy(DEMO_MODEL / name, tmp_path / "base" / name)
    targets = ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
    targets += ["gate_proj", "down_proj"] if variant.startswith("falcon") else ["input_linear", "output_linear"]
    torch.manual_seed(3)
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft.save_pretrained(str(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    tuned = PeftModel.from_pretrained(base.eval(), str(tmp_path / "adapter")).eval()
    llm = LLM(str(tmp_path / "base"), load_format="safetensors", num_kv_blocks=64, max_num_batched_tokens=16,
              lora={"a": str(tmp_path / "adapter")})
    prompts = [[5, 17, 99, 200, 3], list(range(10, 40))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with_adapter = [o.token_ids for o in llm.generate(prompts, params, adapter="a")]
    for p, got in zip(prompts, with_adapter, strict=True):
        ref = tuned.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist()
        assert got == ref
    assert with_adapter != [o.token_ids for o in llm.generate(prompts, params)]  # the adapter mattered
