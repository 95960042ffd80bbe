"""Speculative decoding on the demo model: greedy output equals plain decoding token for token (with
n-gram lookup and with a draft cut from the demo model), for requests with and without the adapter,
beside requests that do not speculate (penalties, stop tokens), under a KV cache small enough to
preempt; the target's logprobs come back for every token; no block outlives its use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from sloth_kernels.attention import AttnMetadata
from sloth_serve.config import Config
from sloth_serve.engine.decode_rows import decode_rows, token_at
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_ADAPTER, DEMO_DRAFT, DEMO_MODEL
from sloth_serve.loader.peft import load_lora
from sloth_serve.loader.truncate import truncate_model
from sloth_serve.models.layers import StepMetadata

TEXTS = ["Return the", "If the file does not exist, raise an error and", "x",
         "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add("]
QUESTION = "What does `json.dumps` do?"


@pytest.fixture(scope="module")
def requests() -> list[tuple[list[int], SamplingParams, int]]:
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    greedy = SamplingParams(max_tokens=32, temperature=0)
    prompts = [tok.encode(t) for t in [chat, *TEXTS]]
    out = [(p, greedy, 0) for p in prompts]
    out.append((prompts[0], greedy, 1))  # the adapter's answer: verified with the adapter's weights
    out.append((prompts[1], SamplingParams(max_tokens=20, temperature=0, logprobs=2), 1))
    out.append((prompts[2], SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3), 0))  # no drafts
    out.append((prompts[4], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                           stop_token_ids=(tok.encode(" b")[-1],)), 0))
    return out


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return truncate_model(DEMO_MODEL, tmp_path_factory.mktemp("draft") / "demo-2-layers", 2)


def generate(requests: list[tuple[list[int], SamplingParams, int]], **config: object) -> tuple[list, LLMEngine]:
    """Requests arriving one a step; returns each one's (tokens, logprobs, finish reason)."""
    engine = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", max_num_batched_tokens=48,
                              max_num_seqs=8, **config))  # type: ignore[arg-type]
    engine.add_lora(1, load_lora("upper", DEMO_ADAPTER, engine.config.max_lora_rank))
    bm = engine.block_manager
    runner_run = engine.runner.run
    engine.mixed_steps = 0  # type: ignore[attr-defined]

    def run(batch, *args):  # type: ignore[no-untyped-def]
        drafts = [bool(seq.spec_token_ids) for seq in batch.seqs]
        engine.mixed_steps += any(drafts) and not all(drafts)  # type: ignore[attr-defined]
        return runner_run(batch, *args)

    engine.runner.run = run  # type: ignore[method-assign]
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list] = {}
    reasons: dict[str, object] = {}
    step = 0
    while step < len(requests) or engine.has_unfinished_requests:
        if step < len(requests):
            prompt, params, adapter = requests[step]
            engine.add_request(str(step), prompt, params, adapter)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            logprobs.setdefault(out.request_id, []).extend(out.new_logprobs)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        # Rolled back: no running sequence holds a block past its tokens.
        for seq in engine.scheduler.running:
            assert len(seq.block_table) <= bm.num_blocks_for(seq.num_tokens)
        step += 1
    assert bm.num_free_blocks == bm.num_blocks
    ids = [str(i) for i in range(len(requests))]
    return [(tokens[i], logprobs[i], reasons[i]) for i in ids], engine


@pytest.fixture(scope="module")
def plain(requests: list) -> list:
    return generate(requests, num_kv_blocks=128)[0]


def check_same(plain: list, got: list) -> None:
    for (tokens, lps, reason), (want_tokens, want_lps, want_reason) in zip(got, plain, strict=True):
        assert tokens == want_tokens and reason == want_reason
        assert [lp.token_id for lp in lps] == [lp.token_id for lp in want_lps]
        for lp, want in zip(lps, want_lps, strict=True):
            assert lp.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t for t, _ in lp.top] == [t for t, _ in want.top]


def test_ngram_greedy_equals_plain_decoding(requests: list, plain: list) -> None:
    got, engine = generate(requests, num_kv_blocks=128, speculative_method="ngram", num_speculative_tokens=4)
    check_same(plain, got)
    stats = engine.scheduler.spec_stats
    assert stats.num_accepted_tokens > 20  # the repeated function is quoted from the prompt
    assert engine.mixed_steps > 0  # type: ignore[attr-defined]  # steps of speculating and plain sequences
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens


def test_draft_model_greedy_equals_plain_decoding(requests: list, plain: list, draft_folder: Path) -> None:
    got, engine = generate(requests, num_kv_blocks=128, speculative_model=str(draft_folder),
                           num_speculative_tokens=3)
    check_same(plain, got)
    assert engine.draft_model is not None and engine.draft_model.config.num_layers == 2
    assert engine.scheduler.spec_stats.num_accepted_tokens > 0


def test_trained_draft_greedy_equals_plain_decoding(requests: list, plain: list) -> None:
    """The committed draft (server/loader/demo/draft: 1 layer, trained like the demo model)."""
    got, engine = generate(requests, num_kv_blocks=128, speculative_model=str(DEMO_DRAFT), num_speculative_tokens=3)
    check_same(plain, got)
    assert engine.draft_model is not None and engine.draft_model.config.num_layers == 1
    assert engine.scheduler.spec_stats.num_accepted_tokens > 0


def test_speculation_under_preemption_equals_plain_decoding(requests: list, plain: list, draft_folder: Path) -> None:
    """A cache of 10 blocks cannot hold every request: sequences are preempted and recomputed, their
    drafts (and the draft model's KV) dropped with their blocks."""
    got, engine = generate(requests, num_kv_blocks=10, speculative_model=str(draft_folder))
    check_same(plain, got)
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.spec_stats.num_accepted_tokens > 0


def test_speculation_is_off_above_the_batch_size(requests: list, plain: list) -> None:
    got, engine = generate(requests, num_kv_blocks=128, speculative_method="ngram", speculative_max_batch_size=1)
    check_same(plain, got)
    # Requests arrive one a step and most run together: only the first steps may speculate.
    assert engine.scheduler.spec_stats.num_drafts < 5


def test_verified_positions_as_decode_rows_give_the_eager_logits() -> None:
    """What a CUDA graph replays for a verify step (server/engine/decode_rows.py: one decode row per
    verified position) computes the eager verify step's logits, on the CPU's reference kernels."""
    engine = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=32,
                              speculative_method="ngram"))
    engine.spec = None  # drafts set by hand below
    engine.add_request("a", list(range(40, 60)), SamplingParams(max_tokens=8, temperature=0))
    engine.add_request("b", list(range(70, 75)), SamplingParams(max_tokens=8, temperature=0))
    engine.step()
    a, b = engine.scheduler.running
    a.spec_token_ids = [61, 62, 63]  # b decodes one token beside it
    batch = engine.scheduler.schedule()
    runner, model = engine.runner, engine.loaded.model
    with torch.inference_mode():
        inputs = runner.prepare(batch)
        eager = model.compute_logits(runner._forward(inputs)[inputs.sample_token_index])
        rows = decode_rows(batch)
        assert rows is not None and len(rows) == 5
        bs = engine.config.block_size
        width = max(len(s.block_table) for s in batch.seqs)
        seq_lens = [p + 1 for _, p in rows]
        attn = AttnMetadata(
            slot_mapping=torch.tensor([s.block_table[p // bs] * bs + p % bs for s, p in rows]),
            block_tables=torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s, _ in rows],
                                      dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32),
            seq_lens_host=seq_lens, query_start_loc_host=list(range(len(rows) + 1)), max_query_len=1,
            max_seq_len=max(seq_lens), num_decodes=len(rows))
        ids = torch.tensor([token_at(s, p) for s, p in rows])
        flat = model.compute_logits(model(ids, torch.tensor([p for _, p in rows]), StepMetadata(attn), runner.kv_caches))
    assert batch.seqs == [b, a] and eager.shape[0] == 5  # the decode first; a's 1 + 3 rows after it
    torch.testing.assert_close(flat, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [False, True])
def test_on_gpu_speculation_gives_the_plain_greedy_tokens(requests: list, draft_folder: Path, eager: bool) -> None:
    """On CUDA verify steps replay the decode graphs (one row per verified position) and the draft
    model's single-token steps replay its own; fp32 so that greedy choices are stable."""
    common = dict(device="cuda", dtype="float32", enforce_eager=eager)
    want = generate(requests, num_kv_blocks=128, **common)[0]
    check_same(want, generate(requests, num_kv_blocks=128, speculative_method="ngram", **common)[0])
    check_same(want, generate(requests, num_kv_blocks=128, speculative_model=str(draft_folder), **common)[0])


def test_sampled_requests_accept_every_draft_of_an_identical_draft_model(requests: list) -> None:
    """With the model as its own draft, q equals p at every row (same weights, same temperature /
    top-k / top-p), so rejection sampling accepts min(1, p/q) = 1: nearly every draft token, wherever
    the rows, probabilities and drafts are matched up right."""
    sampled = [(prompt, SamplingParams(max_tokens=24, temperature=0.8, top_k=40, top_p=0.95, seed=i, ignore_eos=True),
                0) for i, (prompt, _, _) in enumerate(requests[:4])]
    got, engine = generate(sampled, num_kv_blocks=128, speculative_model=str(DEMO_MODEL), num_speculative_tokens=3)
    stats = engine.scheduler.spec_stats
    assert all(len(tokens) == 24 for tokens, _, _ in got)
    assert stats.num_draft_tokens > 30 and stats.acceptance_rate > 0.95


def test_draft_warmup_leaves_the_cache_as_it_was(draft_folder: Path) -> None:
    engine = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=16,
                              speculative_model=str(draft_folder)))
    assert engine.spec is not None and engine.spec.draft is not None
    draft = engine.spec.draft
    draft.warmup((5, 40))
    for k_cache, v_cache in draft.kv_caches:  # only the scratch block (the last) was written
        assert not k_cache[:-1].any() and not v_cache[:-1].any() and k_cache[-1].any()
