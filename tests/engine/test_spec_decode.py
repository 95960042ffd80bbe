"""Speculative decoding on the demo model: greedy output equals plain decoding token for token (with
n-gram lookup and with a draft cut from the demo model), for requests with and without the adapter,
beside requests that do not speculate (penalties, stop tokens), under a KV cache small enough to
preempt; the target's logprobs come back for every token; no block outlives its use."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.config import Config
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.loader import DEMO_ADAPTER, DEMO_MODEL
from server.loader.peft import load_lora
from server.loader.truncate import truncate_model

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
