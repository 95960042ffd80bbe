"""With whole_images (Gemma 3, whose image tokens attend to each other both ways), no prompt chunk
ends inside an image: a chunk stops before it, a sequence waits for a step with room for the whole
image, and an image larger than a step's budget is refused at admission."""

from __future__ import annotations

import pytest
from factories import create_seq, run_step

from sloth_serve.engine.block_manager import BlockManager
from sloth_serve.engine.mm_inputs import ImageInput, MultiModalInputs
from sloth_serve.engine.scheduler import Scheduler, SchedulerConfig
from sloth_serve.engine.sequence import Sequence


def scheduler(budget: int, whole_images: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(8, budget, 256, whole_images=whole_images), BlockManager(64, 4, True))


def with_images(seq: Sequence, *spans: tuple[int, int]) -> Sequence:
    seq.mm = MultiModalInputs(tuple(ImageInput(f"img{a}", a, n, (1, 1, n), None) for a, n in spans))
    return seq


def test_prompt_chunks_never_end_inside_an_image() -> None:
    sched = scheduler(10)
    seq = with_images(create_seq(30), (6, 8), (20, 8))
    sched.add(seq)
    counts = [run_step(sched)[1][0] for _ in range(4)]
    assert counts == [6, 10, 4, 10]  # stops before each image, then takes it whole
    assert seq.num_computed_tokens == 30 and seq.num_output_tokens == 1
    plain = scheduler(10, whole_images=False)  # Qwen2.5-VL's images may be split: causal attention
    plain.add(with_images(create_seq(30), (6, 8), (20, 8)))
    assert [run_step(plain)[1][0] for _ in range(3)] == [10, 10, 10]


def test_an_image_waits_for_a_step_with_room_for_all_of_it() -> None:
    sched = scheduler(10)
    a, b = create_seq(5, max_tokens=4), with_images(create_seq(12), (0, 8))
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == ([a], [5])  # 5 tokens left: b's image (8) does not fit, b waits
    scheduled, counts = run_step(sched)
    assert scheduled == [a, b] and counts == [1, 9]
    scheduled, counts = run_step(sched)
    assert scheduled == [a, b] and counts == [1, 3]


def test_a_running_prompt_skips_steps_without_room_for_its_next_image() -> None:
    sched = scheduler(10)
    d, p = create_seq(3, max_tokens=2), with_images(create_seq(20), (6, 10))
    sched.add(d)
    sched.add(p)
    assert run_step(sched) == ([d, p], [3, 6])  # p stops before its image
    assert run_step(sched) == ([d], [1])  # 9 tokens left: not the image's 10, p skips the step
    assert d.is_finished
    assert run_step(sched) == ([p], [10])  # the whole image in one step
    assert run_step(sched) == ([p], [4])


def test_an_image_larger_than_a_step_is_refused() -> None:
    sched = scheduler(8)
    with pytest.raises(ValueError, match="image of 12 tokens does not fit one step of --max-num-batched-tokens 8"):
        sched.add(with_images(create_seq(20), (2, 12)))
    scheduler(8, whole_images=False).add(with_images(create_seq(20), (2, 12)))  # split across chunks there


def test_an_image_may_pass_the_prompt_bound_beside_decodes() -> None:
    """Beside decoding streams prompts get at most 6 tokens a step here; an image of 10 takes one
    step of 10 (the step budget allows it) instead of waiting for the decodes to end."""
    sched = Scheduler(SchedulerConfig(8, 64, 256, max_prefill_tokens_while_decoding=6, whole_images=True),
                      BlockManager(64, 4, True))
    d = create_seq(3, max_tokens=50)
    sched.add(d)
    run_step(sched)  # d's prompt; it decodes from now on
    p = with_images(create_seq(20, first_token=300), (2, 10))
    sched.add(p)
    assert run_step(sched) == ([d, p], [1, 2])  # the text before the image
    assert run_step(sched) == ([d, p], [1, 10])  # the whole image, past the bound of 6
    assert run_step(sched) == ([d, p], [1, 6])  # text again: the bound holds
