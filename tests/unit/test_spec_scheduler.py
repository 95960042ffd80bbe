"""Speculative decoding in the scheduler and block manager (no torch): draft tokens scheduled with
the last token, accepted ones appended, rejected positions rolled back and their blocks freed, and
the n-gram proposer."""

from __future__ import annotations

from factories import create_scheduler, create_seq, run_step

from sloth_serve.engine.spec_decode.ngram import propose_ngram


def decoding(scheduler, **kw):  # type: ignore[no-untyped-def]
    """A sequence of 10 prompt tokens that has sampled its first token (block size 4)."""
    seq = create_seq(**kw)
    scheduler.add(seq)
    while not seq.output_token_ids:
        run_step(scheduler, token=50)
    assert seq.num_tokens == 11 and seq.num_computed_tokens == 10
    return seq


def test_drafts_are_scheduled_with_the_last_token_and_accepted_ones_appended() -> None:
    s = create_scheduler()
    seq = decoding(s)
    seq.spec_token_ids = [60, 61, 62]
    batch = s.schedule()
    assert batch.num_new_tokens == [4] and batch.samples(0)
    assert len(seq.block_table) == 4  # positions 10..13: 14 tokens of KV
    seq.num_spec_accepted = 2  # the runner accepted 60 and 61, then the target said 70
    s.postprocess(batch, [70])
    assert seq.output_token_ids == [50, 60, 61, 70]
    assert seq.num_computed_tokens == 13  # 70's position is the next step's to compute
    assert seq.spec_token_ids == [] and seq.num_spec_accepted == 0
    assert len(seq.block_table) == 4  # 14 tokens: still 4 blocks
    assert s.spec_stats.num_drafts == 1 and s.spec_stats.num_draft_tokens == 3
    assert s.spec_stats.num_accepted_tokens == 2 and s.spec_stats.accepted_per_pos == [1, 1, 0]


def test_rejected_drafts_give_their_blocks_back() -> None:
    s = create_scheduler(num_blocks=16)
    seq = decoding(s)
    free_before = s.block_manager.num_free_blocks
    seq.spec_token_ids = [60, 61, 62, 63, 64, 65]  # positions up to 16: two more blocks
    batch = s.schedule()
    assert s.block_manager.num_free_blocks == free_before - 2
    seq.num_spec_accepted = 0
    s.postprocess(batch, [70])
    assert seq.output_token_ids == [50, 70] and seq.num_computed_tokens == 11
    assert len(seq.block_table) == 3 and s.block_manager.num_free_blocks == free_before
    # The freed blocks are handed out again, and the sequence goes on decoding one token a step.
    assert run_step(s, token=71)[1] == [1]
    assert seq.output_token_ids == [50, 70, 71]


def test_stop_inside_accepted_drafts_ends_there() -> None:
    s = create_scheduler()
    seq = decoding(s, max_tokens=8, stop_token_ids=(61,))
    seq.spec_token_ids = [60, 61, 62]
    batch = s.schedule()
    seq.num_spec_accepted = 3
    updated = s.postprocess(batch, [70])
    assert updated == [seq] and seq.is_finished and seq.stop_token_id == 61
    assert seq.output_token_ids == [50, 60, 61]  # nothing after the stop token
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_max_tokens_cuts_accepted_drafts() -> None:
    s = create_scheduler()
    seq = decoding(s, max_tokens=3)
    seq.spec_token_ids = [60, 61, 62]
    batch = s.schedule()
    seq.num_spec_accepted = 3
    s.postprocess(batch, [70])
    assert seq.output_token_ids == [50, 60, 61] and seq.finish_reason is not None
    assert seq.finish_reason.value == "length"


def test_token_budget_trims_drafts_first() -> None:
    s = create_scheduler(max_num_batched_tokens=3)
    seq = decoding(s)
    seq.spec_token_ids = [60, 61, 62, 63]
    batch = s.schedule()
    assert batch.num_new_tokens == [3] and seq.spec_token_ids == [60, 61]
    assert batch.samples(0)


def test_drafts_give_way_to_a_lack_of_blocks_before_any_sequence_does() -> None:
    s = create_scheduler(num_blocks=3)  # 12 tokens of KV
    seq = decoding(s)
    seq.spec_token_ids = [60, 61, 62, 63]  # would need a 4th block
    batch = s.schedule()
    assert batch.seqs == [seq] and batch.num_new_tokens == [1] and seq.spec_token_ids == []
    assert s.num_preemptions == 0


def test_preemption_clears_drafts_and_the_draft_models_progress() -> None:
    s = create_scheduler()
    seq = decoding(s)
    seq.spec_token_ids, seq.num_draft_computed = [60], 9
    s._preempt(s.running.pop(), s.schedule())
    assert seq.spec_token_ids == [] and seq.num_draft_computed == 0 and seq.block_table == []


def test_ngram_proposes_what_followed_the_longest_repeated_suffix() -> None:
    assert propose_ngram([1, 2, 3, 4, 9, 2, 3], 2, 1, 3) == [4, 9]
    # The longest suffix wins over a shorter, more recent one: [2, 3] follows 1 2 3 -> 7, not 3 -> 8.
    assert propose_ngram([1, 2, 3, 7, 5, 3, 8, 1, 2, 3], 1, 1, 3) == [7]
    assert propose_ngram([1, 2, 3, 7, 5, 3, 8, 2, 3], 1, 1, 1) == [8]  # the latest match of one token
    assert propose_ngram([1, 2, 3, 4, 5], 3, 1, 3) == []  # nothing repeats
    assert propose_ngram([5, 6, 5], 4, 1, 3) == [6, 5]  # fewer tokens than asked where the text ends
    assert propose_ngram([5, 6, 5], 4, 2, 3) == []  # a 1-token suffix is below the minimum
