"""LFM2 (`Lfm2ForCausalLM`: gated short convolutions + attention) served natively with a state slot
per running sequence: our greedy tokens equal transformers' on a tiny random model through chunked
prefill (the convolution state carried across chunks), continuous batching, and preemption under a
tiny KV cache (the slot freed and the state rebuilt by re-prefill); slots go back when requests end."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.models.config import ModelConfig
from sloth_serve.models.lfm2_config import lfm2_ff_dim

VOCAB = 256
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, layer_types=["conv", "full_attention", "conv", "conv"], conv_L_cache=3,
    max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=2, initializer_range=0.3,
    block_multiple_of=16,
)


def make_lfm2(folder: Path, **overrides: Any) -> torch.nn.Module:
    """A random Lfm2ForCausalLM saved to `folder` (random norms too, so their code paths matter)."""
    torch.manual_seed(0)
    cfg = transformers.Lfm2Config(**{**COMMON, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return model


def hf_greedy(hf: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return [got[str(i)] for i in range(len(prompts))]


def check_prefix_hits(folder: Path, hf: torch.nn.Module, vocab: int, budget: int) -> None:
    """Prompts sharing a prefix with one served before: a hit restores KV blocks and the state snapshot
    taken where that prompt's last full block ended, or where the blocks it shared with an earlier prompt
    ended (a common system prompt: the third user message after it hits), and the tokens still equal
    transformers'."""
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=budget, device="cpu", dtype="float32"))
    gen = torch.Generator().manual_seed(4)
    first = torch.randint(3, vocab, (40,), generator=gen).tolist()  # its snapshot: after 32 tokens (4 blocks)
    tail = torch.randint(3, vocab, (9,), generator=gen).tolist()
    cases = [(first, 0), (first, 32), (first[:35] + tail, 32), (first[:20] + tail, 0), (first[:20] + tail, 24)]
    # the fourth shares blocks 0-1, which have no snapshot: no hit, but a snapshot at 16 for the sixth
    cases.append((first[:20] + tail[::-1], 16))
    system = torch.randint(3, vocab, (27,), generator=gen).tolist()  # blocks 0-2 shared, then the users differ
    cases += [([*system, 3 + i, *tail], cached) for i, cached in enumerate((0, 0, 24, 24))]
    for prompt, cached in cases:
        engine.add_request("r", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        got: list[int] = []
        while engine.has_unfinished_requests:
            for out in engine.step():
                got += out.new_token_ids
                num_cached = out.num_cached_tokens
        assert (got, num_cached) == (hf_greedy(hf, prompt, 6), cached), (len(prompt), cached)
    snaps = engine.block_manager.snapshots
    # each prompt's end (32, 40, 24, 24 after the reversed tail, 32 for each of the 4 users) and the shared
    # blocks' ends (16, 24 after the system prompt)
    assert snaps is not None and len(snaps.by_hash) == 10 and not snaps.pending


def check_system_prompt_hit(folder: Path, hf: torch.nn.Module, vocab: int, budget: int) -> None:
    """A chat's first request says where its system prompt ends (27 tokens: the state is snapshotted at
    24, the end of its last full block), so the second with that system prompt and another user turn
    restores KV and state from there: transformers' tokens, the hit counted in the metrics' running
    totals. Without the hint, the second request of another system prompt hits nothing."""
    from sloth_serve.engine.engine_loop import step_stats

    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=budget, device="cpu", dtype="float32"))
    gen = torch.Generator().manual_seed(5)
    users = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (13, 10)]
    for hinted, want_cached in ((True, 24), (False, 0)):
        system = torch.randint(3, vocab, (27,), generator=gen).tolist()
        for i, (user, cached) in enumerate(zip(users, (0, want_cached), strict=True)):
            prompt = system + user
            hits = step_stats(engine.scheduler, None, None, 0.0).num_prefix_hits
            engine.add_request(f"{hinted}-{i}", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                               system_prompt_end=len(system) if hinted else 0)
            got: list[int] = []
            while engine.has_unfinished_requests:
                for out in engine.step():
                    got += out.new_token_ids
                    num_cached = out.num_cached_tokens
            assert (got, num_cached) == (hf_greedy(hf, prompt, 6), cached), (hinted, i)
            assert step_stats(engine.scheduler, None, None, 0.0).num_prefix_hits - hits == cached
    with pytest.raises(ValueError, match="system_prompt_end"):
        engine.add_request("bad", [5, 6, 7], SamplingParams(), system_prompt_end=4)


def test_prefix_cache_hit_restores_the_state(lfm2: tuple) -> None:
    folder, hf, _, _ = lfm2
    check_prefix_hits(folder, hf, VOCAB, budget=13)


def test_system_prompt_snapshot_on_the_first_request(lfm2: tuple) -> None:
    folder, hf, _, _ = lfm2
    check_system_prompt_hit(folder, hf, VOCAB, budget=13)


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, list[list[int]], list[list[int]]]:
    folder = tmp_path_factory.mktemp("lfm2")
    hf = make_lfm2(folder)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 21, 40, 1, 9)]
    return folder, hf, prompts, [hf_greedy(hf, p, 12) for p in prompts]


@pytest.mark.parametrize(("budget", "blocks"), [(512, 64), (7, 64), (16, 9)],
                         ids=["one-pass", "chunked-prefill", "preemption"])
def test_greedy_matches_transformers(lfm2: tuple, budget: int, blocks: int, device: str = "cpu") -> None:
    folder, _, prompts, want = lfm2
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=blocks, block_size=8,
                              max_num_batched_tokens=budget, max_num_seqs=8, device=device, dtype="float32",
                              cuda_graph_sizes=(1, 2, 4)))
    assert run_engine(engine, prompts, 12) == want
    if device == "cuda":  # decode steps replayed CUDA graphs holding each row's state slot
        assert engine.runner.graphs is not None and engine.runner.graphs.scratch_state is not None
    if blocks == 9:
        assert engine.scheduler.num_preemptions > 0, "the tiny cache was meant to preempt"
    slots = engine.block_manager.state_slots
    assert slots is not None and slots.num_used == 0 and engine.block_manager.num_free_blocks == blocks
    assert len(engine.runner.kv_caches) == 1  # the one attention layer; the convolution layers keep a state


def test_state_slot_is_reused_by_a_new_request(lfm2: tuple) -> None:
    """One slot serving requests one after another: each new prompt starts from an empty state."""
    folder, _, prompts, want = lfm2
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_seqs=1, device="cpu", dtype="float32"))
    for prompt, expected in zip(prompts, want, strict=True):
        assert run_engine(engine, [prompt], 12) == [expected]


def test_a_failing_request_does_not_advance_the_others_state_twice(lfm2: tuple) -> None:
    """A request whose sampling fails after the batch's forward fails alone; the step runs again for
    the others, from their first token (their states had already moved): they still get transformers'
    tokens."""
    folder, _, prompts, want = lfm2
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              device="cpu", dtype="float32"))
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i in (1, 2):
        engine.add_request(str(i), prompts[i], greedy)
    got: dict[str, list[int]] = {"1": [], "2": []}
    for _ in range(3):  # prefill and two decode steps, then a request joins whose seed no generator takes
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    engine.add_request("bad", prompts[0], dataclasses.replace(greedy, temperature=1.0))
    engine.seqs["bad"].params = dataclasses.replace(greedy, temperature=1.0, seed=2**64)  # past admission checks
    errors = []
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.request_id == "bad":
                errors.append(out.error)
            else:
                got[out.request_id] += out.new_token_ids
    assert errors and errors[-1] is not None
    assert [got["1"], got["2"]] == want[1:3]


def test_config_read_as_transformers_reads_it() -> None:
    """LFM2-1.2B's published config (block_ff_dim, full_attn_idxs, tie_embedding) gives transformers' shapes."""
    raw = {"architectures": ["Lfm2ForCausalLM"], "model_type": "lfm2", "block_ff_dim": 12288, "hidden_size": 2048,
           "block_auto_adjust_ff_dim": True, "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
           "conv_L_cache": 3, "full_attn_idxs": [2, 5, 8, 10, 12, 14], "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "norm_eps": 1e-5, "rope_theta": 1000000.0,
           "tie_embedding": True, "vocab_size": 65536, "max_position_embeddings": 128000}
    ours = ModelConfig.from_dict(raw)
    theirs = transformers.Lfm2Config(**{k: v for k, v in raw.items() if k != "architectures"})
    mlp = transformers.models.lfm2.modeling_lfm2.Lfm2MLP(theirs)
    assert ours.intermediate_size == mlp.w1.out_features == lfm2_ff_dim(raw) == 8192
    assert list(ours.layer_types or ()) == theirs.layer_types and ours.kv_layers == [2, 5, 8, 10, 12, 14]
    assert ours.tie_word_embeddings and ours.rope_theta == 1e6 and ours.conv_kernel == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("budget", "blocks"), [(512, 64), (7, 64), (16, 9)])
def test_triton_kernels_match_transformers(lfm2: tuple, budget: int, blocks: int) -> None:
    """The same on CUDA in float32 (the Triton convolution, attention and norms; decode in CUDA graphs)."""
    test_greedy_matches_transformers(lfm2, budget, blocks, device="cuda")


def test_speculative_decoding_is_refused_with_the_reason(lfm2: tuple) -> None:
    """Rejected draft tokens are rolled back by position, which a recurrent state cannot follow."""
    folder = lfm2[0]
    with pytest.raises(ValueError, match="speculative decoding cannot serve lfm2"):
        LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=16, device="cpu",
                         dtype="float32", speculative_method="ngram"))


def make_lfm2_moe(folder: Path) -> torch.nn.Module:
    """A random Lfm2MoeForCausalLM saved to `folder`: one dense layer, then experts behind a sigmoid
    router whose picks add an expert bias (random, so that it changes picks), weights renormalized
    and scaled."""
    torch.manual_seed(0)
    fields = {k: v for k, v in COMMON.items() if k != "block_multiple_of"}
    cfg = transformers.Lfm2MoeConfig(**fields, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                                     num_dense_layers=1, routed_scaling_factor=1.5)
    hf = transformers.Lfm2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif "feed_forward.gate.weight" in name or "experts" in name:
                p.normal_(0.0, 0.3)  # transformers initializes the router and experts small
        for name, b in hf.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0.0, 0.2)
    hf.save_pretrained(folder)
    return hf


def test_moe_variant_greedy_matches_transformers(tmp_path: Path, device: str = "cpu") -> None:
    """Lfm2MoeForCausalLM through chunked prefill and continuous batching: transformers' tokens."""
    hf = make_lfm2_moe(tmp_path)
    engine = LLMEngine(Config(model=str(tmp_path), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=9, device=device, dtype="float32"))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 21, 12)]
    assert run_engine(engine, prompts, 8) == [hf_greedy(hf, p, 8) for p in prompts]
    cfg = engine.runner.model.config
    assert (cfg.num_experts, cfg.mlp_only_layers, cfg.intermediate_size) == (6, (0,), 96)
    layer = engine.runner.model.model.layers[1]
    assert layer.feed_forward.expert_bias.dtype == torch.float32 and layer.feed_forward.expert_bias.abs().sum() > 0


def test_moe_router_bias_picks_but_does_not_weigh() -> None:
    """route_sigmoid equals transformers' Lfm2MoeTopKRouter (bias and no bias), and a bias that moves the
    picks leaves the picked experts' weights their own sigmoid scores."""
    from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeTopKRouter

    from sloth_kernels.moe import route_sigmoid

    torch.manual_seed(0)
    x = torch.randn(7, 16)
    for use_bias in (True, False):
        cfg = transformers.Lfm2MoeConfig(hidden_size=16, num_experts=5, num_experts_per_tok=2, use_expert_bias=use_bias,
                                         routed_scaling_factor=2.0)
        router = Lfm2MoeTopKRouter(cfg)
        router.weight.data.normal_()
        bias = torch.randn(5) if use_bias else None
        _, want_w, want_ids = router(x, bias)
        ids, weights = route_sigmoid(x, router.weight, bias, 2, True, 2.0)
        assert torch.equal(ids, want_ids) and torch.allclose(weights, want_w)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])  # expert 4 always picked, weighed by its own score
    ids, weights = route_sigmoid(x, router.weight, bias, 2, False, 1.0)
    assert (ids[:, 0] == 4).all()
    assert torch.allclose(weights[:, 0], (x @ router.weight.t()).sigmoid()[:, 4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_variant_on_cuda_matches_transformers(tmp_path: Path) -> None:
    """The same on CUDA in float32: the grouped Triton experts behind the sigmoid router, decode in graphs."""
    test_moe_variant_greedy_matches_transformers(tmp_path, device="cuda")
