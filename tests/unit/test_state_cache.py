"""State slots (models with recurrent layers) go with a sequence's KV blocks: taken at its first
allocation, kept while it runs, given back on finish, abort and preemption; no slot, no allocation."""

from __future__ import annotations

from factories import create_seq

from sloth_serve.engine.block_manager import BlockManager
from sloth_serve.engine.scheduler import Scheduler, SchedulerConfig
from sloth_serve.engine.sequence import FinishReason
from sloth_serve.engine.state_cache import StateSlots


def test_slot_taken_with_blocks_and_given_back_with_them() -> None:
    bm = BlockManager(10, 4, state_slots=StateSlots(2))
    a, b, c = create_seq(5), create_seq(5), create_seq(5)
    assert bm.allocate_slots(a, 5) and bm.allocate_slots(b, 5)
    assert {a.state_slot, b.state_slot} == {0, 1}
    free_blocks = bm.num_free_blocks
    assert not bm.allocate_slots(c, 5), "no slot left: the allocation must fail"
    assert c.state_slot is None and c.block_table == [] and bm.num_free_blocks == free_blocks
    slot = a.state_slot
    assert bm.allocate_slots(a, 4) and a.state_slot == slot  # a running sequence keeps its slot
    bm.free(a)
    assert a.state_slot is None and bm.state_slots is not None and bm.state_slots.num_used == 1
    assert bm.allocate_slots(c, 5) and c.state_slot == slot


def test_preemption_and_abort_give_slots_back() -> None:
    bm = BlockManager(3, 4, enable_prefix_caching=False, state_slots=StateSlots(3))
    sched = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64, max_model_len=64), bm)
    seqs = [create_seq(4, max_tokens=8) for _ in range(2)]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert len(batch.seqs) == 2 and bm.state_slots is not None and bm.state_slots.num_used == 2
    sched.postprocess(batch, [7, 7])
    batch = sched.schedule()  # each needs a second block, only one is free: the newer is preempted
    assert batch.num_preempted == 1 and seqs[1].state_slot is None and bm.state_slots.num_used == 1
    sched.abort(seqs[0].request_id, FinishReason.ABORT)
    assert bm.state_slots.num_used == 0 and seqs[0].state_slot is None


def test_snapshots_cap_chunks_at_the_prompt_boundary_and_reuse_rows_lru() -> None:
    from sloth_serve.engine.state_snapshots import StateSnapshots

    snaps = StateSnapshots(first_row=5, num_rows=2, block_size=4)
    seq = create_seq(11)  # boundary: the last full block a later prompt can hit ends at 8
    assert snaps.boundary(seq) == 8
    assert snaps.cap(seq, 0, 64) == 8 and snaps.cap(seq, 8, 64) == 64 and snaps.cap(seq, 2, 3) == 3
    snaps.take(101, slot=0)
    snaps.take(102, slot=1)
    snaps.take(101, slot=3)  # already kept: no second copy
    assert snaps.drain() == [(0, 5), (1, 6)]
    assert snaps.restore(101, slot=2) and not snaps.restore(999, slot=2)  # 101 is now the most recent
    snaps.take(103, slot=4)  # evicts 102, the least recently used
    assert snaps.drain() == [(5, 2), (4, 6)] and set(snaps.by_hash) == {101, 103}


def test_snapshots_also_cap_chunks_where_the_shared_blocks_end() -> None:
    from sloth_serve.engine.state_snapshots import StateSnapshots

    snaps = StateSnapshots(first_row=5, num_rows=2, block_size=4)
    seq = create_seq(19)  # its own point at 16
    seq.shared_prefix_end = 8  # its first two blocks were cached without a snapshot (a shared system prompt)
    assert snaps.points(seq) == [8, 16]
    assert snaps.cap(seq, 0, 64) == 8 and snaps.cap(seq, 8, 64) == 8 and snaps.cap(seq, 16, 64) == 64
    seq.shared_prefix_end = 16  # the same point as its own: one snapshot
    assert snaps.points(seq) == [16]


def test_snapshots_also_cap_chunks_where_the_system_prompt_ends() -> None:
    """The front end's system prompt end, floored to a block: a point of the first request already,
    beside the shared blocks' end and the prompt's own; none past the prompt's own point."""
    from sloth_serve.engine.state_snapshots import StateSnapshots

    snaps = StateSnapshots(first_row=5, num_rows=2, block_size=4)
    seq = create_seq(19)  # its own point at 16
    seq.system_prompt_end = 7  # the user turn starts in the second block: the first one is the system's
    assert snaps.points(seq) == [4, 16]
    assert snaps.cap(seq, 0, 64) == 4 and snaps.cap(seq, 4, 64) == 12
    seq.shared_prefix_end = 12
    assert snaps.points(seq) == [4, 12, 16]
    for end, points in ((3, [12, 16]), (16, [12, 16]), (19, [12, 16]), (8, [8, 12, 16])):
        seq.system_prompt_end = end  # inside the first block, at or past the prompt's own point, on a block
        assert snaps.points(seq) == points, end
