"""The prompt-token bound of a step while sequences decode (issue 23): a long prompt beside running
streams is prefilled in chunks no larger than max_prefill_tokens_while_decoding, so each decode step
it shares stays short; with nothing decoding, or more requests waiting for their prompts than streams
decoding (a burst of arrivals), prompts take the whole max_num_batched_tokens."""

from __future__ import annotations

import pytest
from factories import create_scheduler, create_seq, run_step

from sloth_serve.engine.scheduler import SchedulerConfig


def _decoding(sched, count: int = 2) -> list:  # type: ignore[no-untyped-def]
    seqs = [create_seq(4, max_tokens=50, first_token=1000 + 10 * i) for i in range(count)]
    for s in seqs:
        sched.add(s)
    run_step(sched)  # prompts done, one token each: they decode from here
    return seqs


def test_prompt_alone_takes_the_whole_token_budget() -> None:
    sched = create_scheduler(
        max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8, max_model_len=512, num_blocks=128
    )
    seq = create_seq(150)
    sched.add(seq)
    assert [run_step(sched)[1] for _ in range(3)] == [[64], [64], [22]]


def test_prompt_beside_decodes_is_chunked_to_the_bound() -> None:
    sched = create_scheduler(
        max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8, max_model_len=512, num_blocks=128
    )
    decoding = _decoding(sched)
    long = create_seq(20, first_token=300)
    sched.add(long)
    steps = [run_step(sched) for _ in range(3)]
    for seqs, counts in steps:  # every step: both decodes, then at most 8 prompt tokens
        assert seqs[:2] == decoding and counts[:2] == [1, 1]
        assert seqs[2:] == [long]
    assert [counts[2] for _, counts in steps] == [8, 8, 4]
    assert long.num_output_tokens == 1 and all(s.num_output_tokens == 4 for s in decoding)


def test_bound_is_shared_by_every_prompt_of_the_step() -> None:
    sched = create_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=10, num_blocks=128)
    decoding = _decoding(sched, 3)  # three streams: three waiting prompts are bounded
    a, b, c = create_seq(6, first_token=300), create_seq(6, first_token=400), create_seq(6, first_token=500)
    for s in (a, b, c):
        sched.add(s)
    seqs, counts = run_step(sched)
    assert seqs == [*decoding, a, b] and counts == [1, 1, 1, 6, 4]  # c waits: no prompt budget left
    assert list(sched.waiting) == [c]
    seqs, counts = run_step(sched)  # b's last chunk comes first (running), then c
    assert seqs == [*decoding, a, b, c] and counts == [1, 1, 1, 1, 2, 6]


def test_a_chunked_prompt_waits_while_an_older_one_takes_the_bound() -> None:
    sched = create_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8, num_blocks=128)
    decoding = _decoding(sched, 2)
    a, b = create_seq(12, first_token=300), create_seq(12, first_token=400)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == ([*decoding, a], [1, 1, 8])
    # b never started, a still has 4 tokens: a finishes its prompt, b starts with what is left
    assert run_step(sched) == ([*decoding, a, b], [1, 1, 4, 4])
    assert run_step(sched) == ([*decoding, a, b], [1, 1, 1, 8])


def test_recomputing_a_preempted_sequence_counts_as_prompt() -> None:
    sched = create_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=4, num_blocks=128)
    decoding = _decoding(sched, 1)
    victim = create_seq(6, first_token=300)
    for token in (7, 8, 9):  # as preempted: 3 tokens sampled, none of its 9 tokens in the cache any more
        victim.append_token(token)
    sched.add(victim)
    counts = [run_step(sched)[1] for _ in range(3)]
    assert counts == [[1, 4], [1, 4], [1, 1]]  # the 9 tokens recomputed 4 at a time, then it decodes
    assert victim.num_output_tokens == 4 and decoding[0].num_output_tokens == 4


def test_could_admit_is_false_when_running_prompts_use_the_bound() -> None:
    sched = create_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8, num_blocks=128)
    _decoding(sched, 2)
    sched.add(create_seq(30, first_token=300))
    run_step(sched)  # 8 of its 30 tokens: 22 left, more than the bound
    sched.add(create_seq(4, first_token=400))
    assert not sched.could_admit()
    sched.add(create_seq(4, first_token=500))  # three prompts held, two streams: no bound any more
    assert sched.could_admit()


def test_a_burst_beside_few_streams_is_not_bounded() -> None:
    """64 requests sent at once reach the engine one after another: the first decodes alone while
    the rest wait. Holding them to the bound would admit a few per step (13 steps of 5 prompts at
    the 8B default); more requests held than streams paused take max_num_batched_tokens."""
    sched = create_scheduler(max_num_seqs=16, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8,
                             num_blocks=128)
    first = _decoding(sched, 1)[0]
    burst = [create_seq(6, first_token=300 + 10 * i) for i in range(12)]
    for s in burst:
        sched.add(s)
    seqs, counts = run_step(sched)  # 1 decode + 10 prompts of 6 + 3 tokens of the 11th: 64 tokens
    assert seqs == [first, *burst[:11]] and counts == [1, *[6] * 10, 3]
    # 11 streams decode, 2 prompts held (one half done, one waiting): bounded again
    seqs, counts = run_step(sched)
    assert seqs == [first, *burst[:12]] and counts == [1, *[1] * 10, 3, 5]
    assert sum(counts[11:]) == 8 and not sched.waiting


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="invalid scheduler limits"):
        SchedulerConfig(max_prefill_tokens_while_decoding=0)


def test_a_queue_behind_full_sequence_slots_keeps_the_bound() -> None:
    """Every slot taken (three streams, one chunked prompt) and many requests queued behind them:
    none of the queue could be admitted, so the running prompt keeps its chunks to the bound."""
    sched = create_scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8,
                             num_blocks=128)
    decoding = _decoding(sched, 3)
    long = create_seq(40, first_token=300)
    sched.add(long)
    for i in range(6):
        sched.add(create_seq(6, first_token=400 + 10 * i))
    assert run_step(sched) == ([*decoding, long], [1, 1, 1, 8])
    assert run_step(sched) == ([*decoding, long], [1, 1, 1, 8])
    assert not sched.could_admit()


def test_a_queue_held_back_by_lora_slots_keeps_the_bound() -> None:
    """Both LoRA slots are held by the running streams and the queue's first request needs a third
    adapter: none of the queue could be admitted, so the running prompt keeps its chunks to the bound."""
    sched = create_scheduler(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8,
                             num_blocks=128, max_loras=2)
    decoding = [create_seq(4, max_tokens=50, first_token=1000 + 10 * i, adapter_id=1 + i) for i in range(2)]
    for s in decoding:
        sched.add(s)
    run_step(sched)
    long = create_seq(40, first_token=300, adapter_id=1)
    sched.add(long)
    for i in range(4):
        sched.add(create_seq(6, first_token=400 + 10 * i, adapter_id=3))
    assert run_step(sched) == ([*decoding, long], [1, 1, 8])
    assert run_step(sched) == ([*decoding, long], [1, 1, 8])

