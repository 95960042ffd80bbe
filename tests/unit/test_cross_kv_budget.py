"""The bytes of cross-attention images' keys and values (Llama 3.2 Vision) go with a sequence's KV
blocks: reserved when it is admitted, released (and its keys and values dropped) when it finishes,
is aborted or is preempted; a sequence whose images do not fit what is left waits in the queue
(those behind it too, as for KV blocks), and one that could never fit is refused at admission."""

from __future__ import annotations

import pytest
from factories import create_scheduler, create_seq, run_step

from sloth_serve.engine.cross_kv import CrossKVBudget
from sloth_serve.engine.mm_inputs import ImageInput, MultiModalInputs
from sloth_serve.engine.scheduler import Scheduler
from sloth_serve.engine.sequence import Sequence

PER_IMAGE = 1000


def scheduler(num_images: int, num_blocks: int = 64) -> Scheduler:
    sched = create_scheduler(num_blocks=num_blocks)
    sched.block_manager.cross_kv = CrossKVBudget(num_images * PER_IMAGE, PER_IMAGE)
    return sched


def with_images(seq: Sequence, *offsets: int) -> Sequence:
    seq.mm = MultiModalInputs(tuple(ImageInput(f"img{a}", a, 1, (1, 1, 1), None) for a in offsets), every_token=True)
    return seq


def test_images_wait_in_the_queue_for_room() -> None:
    sched = scheduler(2)
    budget = sched.block_manager.cross_kv
    assert budget is not None
    a, b, text = with_images(create_seq(6, max_tokens=2), 1, 3), with_images(create_seq(6), 2), create_seq(6)
    for seq in (a, b, text):
        sched.add(seq)
    scheduled, _ = run_step(sched)
    assert scheduled == [a]  # b's image does not fit beside a's two: b, and the text behind it, wait
    assert budget.num_used == a.cross_kv_bytes == 2 * PER_IMAGE
    assert run_step(sched)[0] == [a]
    assert a.is_finished and a.cross_kv_bytes == 0 and budget.num_used == 0
    scheduled, _ = run_step(sched)
    assert scheduled == [b, text]
    assert budget.num_used == PER_IMAGE and text.cross_kv_bytes == 0


def test_abort_and_preemption_release_the_bytes_and_drop_the_keys() -> None:
    sched = scheduler(4, num_blocks=5)  # 20 tokens of KV: two 8-token prompts cannot both grow far
    budget = sched.block_manager.cross_kv
    assert budget is not None
    old, new = with_images(create_seq(8, max_tokens=20), 0), with_images(create_seq(8, max_tokens=20), 0, 4)
    sched.add(old)
    sched.add(new)
    assert run_step(sched)[0] == [old, new]
    new.cross_kv = object()  # what the model runner keeps on the sequence
    assert budget.num_used == 3 * PER_IMAGE
    while new.num_preemptions == 0:
        run_step(sched)
    assert new.cross_kv is None and new.cross_kv_bytes == 0 and budget.num_used == PER_IMAGE
    old.cross_kv = object()
    sched.abort(old.request_id)
    assert old.cross_kv is None and budget.num_used == 0


def test_more_images_than_the_budget_holds_are_refused() -> None:
    sched = scheduler(2)
    with pytest.raises(ValueError, match=r"3 images .* send fewer images"):
        sched.add(with_images(create_seq(8), 1, 3, 5))
    sched.add(with_images(create_seq(8), 1, 3))
