"""Continuous batching on CPU without torch: budgets, chunked prefill, preemption, abort, stopping."""

from __future__ import annotations

import pytest
from factories import create_scheduler, create_seq, run_step

from sloth_serve.engine.scheduler import Scheduler
from sloth_serve.engine.sequence import FinishReason, Sequence, SequenceStatus


def test_admission_respects_max_num_seqs() -> None:
    sched = create_scheduler(max_num_seqs=2)
    seqs = [create_seq(4) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    scheduled, _ = run_step(sched)
    assert scheduled == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]


def test_admission_respects_token_budget_and_chunks_the_prompt_that_overflows() -> None:
    sched = create_scheduler(max_num_batched_tokens=10)
    a, b = create_seq(6), create_seq(8)
    sched.add(a)
    sched.add(b)
    scheduled, counts = run_step(sched)
    assert scheduled == [a, b] and counts == [6, 4]  # b is chunked to the remaining budget
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0
    scheduled, counts = run_step(sched)
    assert scheduled == [a, b] and counts == [1, 4]  # decode first, then b's last chunk
    assert b.num_output_tokens == 1


def test_long_prompt_is_prefilled_in_chunks() -> None:
    sched = create_scheduler(max_num_batched_tokens=16)
    seq = create_seq(40)
    sched.add(seq)
    counts = [run_step(sched)[1][0] for _ in range(3)]
    assert counts == [16, 16, 8]
    assert seq.num_output_tokens == 1 and seq.num_computed_tokens == 40


def test_new_requests_join_running_ones_every_step() -> None:
    sched = create_scheduler()
    a = create_seq(4, max_tokens=5)
    sched.add(a)
    run_step(sched)
    b = create_seq(4, first_token=300)
    sched.add(b)
    scheduled, counts = run_step(sched)
    assert scheduled == [a, b] and counts == [1, 4]


def test_preempts_newest_when_blocks_run_out_and_recomputes_it() -> None:
    # 4 blocks of 4 tokens: two 8-token prompts take 2 blocks each; the next decode needs a third.
    sched = create_scheduler(num_blocks=4, block_size=4, prefix_caching=False)
    old, new = create_seq(8, max_tokens=4), create_seq(8, max_tokens=4, first_token=500)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both prefilled, one token sampled each; all 4 blocks used
    scheduled, _ = run_step(sched)  # old needs a 3rd block: new is preempted
    assert scheduled == [old]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert sched.num_preemptions == 1
    while sched.has_work:
        run_step(sched)
    assert old.is_finished and new.is_finished
    assert new.num_output_tokens == 4  # recomputed from its tokens, then continued
    assert sched.block_manager.num_free_blocks == 4


def test_abort_frees_every_block() -> None:
    sched = create_scheduler(num_blocks=16)
    seqs = [create_seq(9, first_token=100 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    waiting = create_seq(5)
    sched.add(waiting)
    for s in [*seqs, waiting]:
        assert sched.abort(s.request_id) is s
        assert s.finish_reason is FinishReason.ABORT
    assert not sched.has_work
    assert sched.block_manager.num_free_blocks == 16
    assert all(b.ref_count == 0 for b in sched.block_manager.blocks)
    assert sched.abort("unknown") is None


def test_shared_prefix_blocks_are_reused_and_freed_by_reference_count() -> None:
    sched = create_scheduler(num_blocks=16, block_size=4)
    a = create_seq(13, max_tokens=3)
    sched.add(a)
    run_step(sched)
    b = create_seq(13, max_tokens=3)  # same tokens
    sched.add(b)
    _, counts = run_step(sched)
    assert counts == [1, 1]  # b computes only its last token: 12 came from the cache
    assert b.num_cached_tokens == 12
    assert b.block_table[:3] == a.block_table[:3]
    while sched.has_work:
        run_step(sched)
    bm = sched.block_manager
    assert bm.num_free_blocks == 16 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_stops_on_eos_max_tokens_and_stop_token_ids() -> None:
    sched = create_scheduler()
    eos, length, stop_id = create_seq(3, eos=7), create_seq(3, max_tokens=2), create_seq(3, stop_token_ids=(7,))
    for s in (eos, length, stop_id):
        sched.add(s)
    run_step(sched, token=7)
    assert eos.finish_reason is FinishReason.STOP
    assert stop_id.finish_reason is FinishReason.STOP and stop_id.stop_token_id == 7
    assert not length.is_finished
    run_step(sched, token=7)
    assert length.finish_reason is FinishReason.LENGTH


def test_ignore_eos_and_min_tokens_delay_stopping() -> None:
    sched = create_scheduler()
    ignore = create_seq(3, eos=7, max_tokens=3, ignore_eos=True)
    min_tok = create_seq(3, eos=7, max_tokens=5, min_tokens=2)
    sched.add(ignore)
    sched.add(min_tok)
    run_step(sched, token=7)
    assert not min_tok.is_finished  # one output token < min_tokens
    run_step(sched, token=7)
    assert min_tok.finish_reason is FinishReason.STOP
    run_step(sched, token=7)
    assert ignore.finish_reason is FinishReason.LENGTH and ignore.num_output_tokens == 3


def test_max_model_len_ends_generation_and_rejects_long_prompts() -> None:
    sched = create_scheduler(max_model_len=12)
    seq = create_seq(10, max_tokens=100)
    sched.add(seq)
    while sched.has_work:
        run_step(sched)
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 12
    with pytest.raises(ValueError, match="max_model_len is 12"):
        sched.add(create_seq(12))


def test_batch_holds_at_most_max_loras_adapters() -> None:
    sched = create_scheduler(max_loras=2)
    seqs = [create_seq(3, adapter_id=i, first_token=10 * i) for i in (1, 2, 3, 0)]
    for s in seqs:
        sched.add(s)
    scheduled, _ = run_step(sched)
    assert scheduled == seqs[:2]  # the third adapter waits (in order: the base request waits behind it)


def test_prompt_larger_than_whole_cache_is_rejected() -> None:
    sched = create_scheduler(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV cache holds only 8"):
        sched.add(create_seq(9))


def run_until_finished(sched: Scheduler, seq: Sequence, max_steps: int) -> None:
    sched.add(seq)
    for _ in range(max_steps):
        run_step(sched)
        if seq.is_finished:
            break


def test_sequence_outgrowing_the_whole_cache_ends_and_is_listed_for_the_engine() -> None:
    sched = create_scheduler(num_blocks=3, block_size=4, prefix_caching=False, max_model_len=256)
    seq = create_seq(10, max_tokens=100)
    run_until_finished(sched, seq, 10)
    assert seq.finish_reason is FinishReason.LENGTH
    assert sched.finished_unscheduled == [seq]
    assert sched.block_manager.num_free_blocks == 3


def test_sequence_outgrowing_a_cache_larger_than_a_step_ends_too() -> None:
    """Its recompute after the preemption takes steps of max_num_batched_tokens, each of which fits
    the cache; only the last token does not. It ends rather than being preempted there forever
    (prefix caching off, as in the warmup, or evicted: nothing of it is found cached)."""
    sched = create_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=16, prefix_caching=False,
                             max_model_len=256)
    seq = create_seq(10, max_tokens=200)
    run_until_finished(sched, seq, 60)
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 33 and seq.num_preemptions == 1
    assert sched.finished_unscheduled == [seq] and not sched.has_work
    assert sched.block_manager.num_free_blocks == 8
