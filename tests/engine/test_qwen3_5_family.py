"""Qwen3.5's text model (`Qwen3_5ForCausalLM`: Gated DeltaNet + gated attention) served natively with
a state slot per running sequence: our greedy tokens equal transformers' (its torch fallback for the
gated delta rule) on a tiny random model through one-pass and chunked prefill, continuous batching
and preemption under a tiny KV cache."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_lfm2_family import check_prefix_hits, check_system_prompt_hit, hf_greedy, run_engine

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader.adapter_modules import AdapterModules
from sloth_serve.loader.peft import LoRAWeights
from sloth_serve.models.config import ModelConfig

VOCAB = 256
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=8, linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention",
                                                                    "linear_attention", "linear_attention"],
    max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=2, initializer_range=0.3,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)


def make_qwen3_5(folder: Path) -> torch.nn.Module:
    """A random Qwen3_5ForCausalLM saved to `folder` (random norms, gates and decays, so their paths matter)."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3_5TextConfig(**COMMON)
    cfg.architectures = ["Qwen3_5ForCausalLM"]
    model = transformers.Qwen3_5ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "dt_bias" in name or "A_log" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]], list[list[int]], torch.nn.Module]:
    folder = tmp_path_factory.mktemp("qwen3_5")
    hf = make_qwen3_5(folder)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 21, 70, 1)]
    return folder, prompts, [hf_greedy(hf, p, 10) for p in prompts], hf


@pytest.mark.parametrize(("budget", "blocks"), [(512, 64), (9, 64), (24, 12)],
                         ids=["one-pass", "chunked-prefill", "preemption"])
def test_greedy_matches_transformers(qwen: tuple, budget: int, blocks: int, device: str = "cpu") -> None:
    folder, prompts, want, _ = qwen
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=blocks, block_size=8,
                              max_num_batched_tokens=budget, max_num_seqs=8, device=device, dtype="float32",
                              max_model_len=min(128, blocks * 8)))  # no longer than the cache holds
    assert run_engine(engine, prompts, 10) == want
    if device == "cuda":  # decode steps replayed CUDA graphs holding each row's state slot
        assert engine.runner.graphs is not None and engine.runner.graphs.scratch_state is not None
    if blocks == 12:
        assert engine.scheduler.num_preemptions > 0, "the tiny cache was meant to preempt"
    slots = engine.block_manager.state_slots
    assert slots is not None and slots.num_used == 0 and len(engine.runner.kv_caches) == 1


def test_prefix_cache_hit_restores_the_state(qwen: tuple) -> None:
    check_prefix_hits(qwen[0], qwen[3], VOCAB, budget=512)


def test_chunked_prefill_leaves_the_state_of_one_pass(qwen: tuple) -> None:
    """A 150-token prompt prefilled in one step (chunked form: 64 + 64 + 22), in 100 + 50 and in
    pieces of 40 (token by token) leaves the same convolution and recurrent states in its slot."""
    folder = qwen[0]
    prompt = torch.randint(3, VOCAB, (150,), generator=torch.Generator().manual_seed(7)).tolist()
    states = []
    for budget in (512, 100, 40):
        engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                                  max_num_batched_tokens=budget, max_num_seqs=1, device="cpu", dtype="float32",
                                  max_model_len=256, enable_prefix_caching=False))
        run_engine(engine, [prompt], 1)  # one token: sampled from the prefill, no decode step after it
        states.append([t[0].clone() for t in engine.runner.model.state_tensors()])  # slot 0: the only one
    for other in states[1:]:
        for ours, theirs in zip(states[0], other, strict=True):
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert any(t.abs().sum() > 0 for t in states[0])


def test_system_prompt_snapshot_on_the_first_request(qwen: tuple) -> None:
    check_system_prompt_hit(qwen[0], qwen[3], VOCAB, budget=512)


def test_adapter_with_its_own_norms_equals_transformers_with_them(qwen: tuple) -> None:
    """An adapter saving its own norms (1 + w, as the base's): its requests get the tokens of the model
    with those norms, the base's requests in the same batch the base's tokens; a Gated DeltaNet gated
    norm of its own is refused."""
    folder, prompts, want, hf = qwen
    torch.manual_seed(5)
    own = {name: torch.randn(64) * 0.5 for name in ("model.norm", "model.layers.1.input_layernorm")}
    own["model.layers.1.self_attn.q_norm"] = torch.randn(16) * 0.5
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              device="cpu", dtype="float32", max_model_len=128))
    engine.add_lora(1, LoRAWeights("norms", "-", 8, None, {}, modules=AdapterModules(norms=own)))
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine.add_request("base", prompts[1], greedy)
    engine.add_request("own", prompts[1], greedy, adapter_id=1)
    got: dict[str, list[int]] = {"base": [], "own": []}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    tuned = copy.deepcopy(hf)
    with torch.no_grad():
        for name, w in own.items():
            tuned.get_submodule(name).weight.copy_(w)
    assert got == {"base": want[1], "own": hf_greedy(tuned, prompts[1], 10)} and got["own"] != want[1]
    gated = {"model.layers.0.linear_attn.norm": torch.ones(8)}
    with pytest.raises(ValueError, match="gated norm"):
        engine.add_lora(2, LoRAWeights("gated", "-", 8, None, {}, modules=AdapterModules(norms=gated)))


def test_moe_variant_greedy_matches_transformers(tmp_path: Path) -> None:
    """Qwen3_5MoeForCausalLM: the same layers with every MLP sparse (3-D experts, a shared expert behind
    a sigmoid gate), through chunked prefill."""
    torch.manual_seed(0)
    fields = {k: v for k, v in COMMON.items() if k != "intermediate_size"}
    cfg = transformers.Qwen3_5MoeTextConfig(**fields, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=48)
    cfg.architectures = ["Qwen3_5MoeForCausalLM"]
    hf = transformers.Qwen3_5MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "dt_bias" in name or "A_log" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif "mlp.gate.weight" in name or "experts" in name:
                p.normal_(0.0, 0.3)  # transformers initializes the router and experts small / empty
    hf.save_pretrained(tmp_path)
    engine = LLMEngine(Config(model=str(tmp_path), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=9, device="cpu", dtype="float32", max_model_len=128))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 21)]
    assert run_engine(engine, prompts, 8) == [hf_greedy(hf, p, 8) for p in prompts]
    assert engine.runner.model.config.num_experts == 6


def test_image_text_checkpoint_serves_its_text_model(tmp_path: Path) -> None:
    """A Qwen3_5ForConditionalGeneration folder (how Qwen publishes Qwen3.5 and Unsloth saves its
    fine-tunes): its text model is served natively (beside its vision encoder: images in
    tests/engine/test_qwen3_5_vision.py) and gives the image-text model's own greedy tokens for text
    prompts, across chunked prefill."""
    torch.manual_seed(0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16)
    rope = {**COMMON["rope_parameters"], "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    cfg = transformers.Qwen3_5Config(text_config={**COMMON, "rope_parameters": rope}, vision_config=vision,
                                     image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, tie_word_embeddings=False)
    hf = transformers.Qwen3_5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "dt_bias" in name or "A_log" in name:
                p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path)
    ours = ModelConfig.from_folder(tmp_path)
    assert ours.multimodal and ours.family == "qwen3_5" and ours.kv_layers == [1] and not ours.tie_word_embeddings
    engine = LLMEngine(Config(model=str(tmp_path), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=9, device="cpu", dtype="float32", max_model_len=128))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB - 2, (n,), generator=gen).tolist() for n in (5, 30)]
    assert run_engine(engine, prompts, 8) == [hf_greedy(hf, p, 8) for p in prompts]


def test_multi_token_prediction_head_is_left_on_disk(qwen: tuple, tmp_path: Path) -> None:
    """Qwen publishes Qwen3.5 with its multi-token prediction head (mtp.*, which transformers skips on
    load): the checkpoint still serves, with the same tokens, the head's tensors left unread."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, prompts, want, _ = qwen
    for f in folder.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = load_file(tmp_path / "model.safetensors")
    hidden = COMMON["hidden_size"]
    weights["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden)
    weights["mtp.norm.weight"] = torch.ones(hidden)
    weights["mtp.layers.0.self_attn.q_proj.weight"] = torch.randn(2 * hidden, hidden)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    engine = LLMEngine(Config(model=str(tmp_path), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              device="cpu", dtype="float32", max_model_len=128))
    assert run_engine(engine, prompts, 10) == want


def test_config_reads_transformers_defaults() -> None:
    """A config.json that leaves layer_types and the rotary share out: every fourth layer full attention,
    a quarter of each head rotated (transformers' defaults)."""
    ours = ModelConfig.from_dict({"architectures": ["Qwen3_5ForCausalLM"], "num_hidden_layers": 8,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 1e7}})
    theirs = transformers.Qwen3_5TextConfig(num_hidden_layers=8)
    assert list(ours.layer_types or ()) == theirs.layer_types and ours.kv_layers == [3, 7]
    assert ours.rotary_dim == 64 and ours.linear_heads == (16, 32) and ours.has_state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("budget", "blocks"), [(512, 64), (9, 64), (24, 12)])
def test_triton_kernels_match_transformers(qwen: tuple, budget: int, blocks: int) -> None:
    test_greedy_matches_transformers(qwen, budget, blocks, device="cuda")
