"""With whole_images (Gemma 3, whose image tokens attend to each other both ways), no prompt chunk
ends inside an image: a chunk stops before it, a sequence waits for a step with room for the whole
image (never starved by a steady decode load: newer requests do not take that room first), and an
image larger than a step's budget is refused at admission."""

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


def steady_decodes(sched: Scheduler, image_seq: Sequence, steps: int, arrivals: int = 1) -> int | None:
    """Run `steps` steps while `arrivals` new text requests (3-token prompts, 40 tokens each) arrive
    every step whenever a sequence slot is free (decodes never stop); returns the step at which
    `image_seq` got its first token (None: never)."""
    for step in range(steps):
        for _ in range(arrivals):
            if len(sched.running) + len(sched.waiting) < sched.config.max_num_seqs:
                sched.add(create_seq(3, max_tokens=40, first_token=500 + step))
        run_step(sched)
        if image_seq.num_output_tokens:
            return step
    return None


@pytest.mark.parametrize("image_at", [0, 5])  # admitted at its image / running, stopped before it
def test_an_image_prompt_is_not_starved_by_a_steady_decode_load(image_at: int) -> None:
    """Prompts may take 4 tokens a step beside decodes, the image needs 20: new decoding requests
    keep arriving, yet the image's prompt finishes within a few steps, each taking at most the
    step budget."""
    sched = Scheduler(SchedulerConfig(8, 32, 256, max_prefill_tokens_while_decoding=4, whole_images=True),
                      BlockManager(512, 4, True))
    assert steady_decodes(sched, create_seq(1), 6) is None  # a decode load builds up
    assert all(s.num_output_tokens for s in sched.running)
    p = with_images(create_seq(30, max_tokens=2, first_token=300), (image_at, 20))
    sched.add(p)
    got = steady_decodes(sched, p, 40)
    assert got is not None and got <= 8
    assert len(sched.running) + len(sched.waiting) == 8  # the load never stopped


def test_an_image_behind_older_decodes_runs_before_newer_requests_take_the_room() -> None:
    """A step of 24 tokens with 7 decodes leaves 17, less than the image's 20: the image waits for
    older decodes to end, but requests arriving after it never overtake it, so it runs as soon as
    enough of the older ones have finished."""
    sched = Scheduler(SchedulerConfig(8, 24, 256, max_prefill_tokens_while_decoding=4, whole_images=True),
                      BlockManager(512, 4, True))
    for i in range(7):
        sched.add(create_seq(3, max_tokens=10 + 2 * i, first_token=500 + i))
    run_step(sched)
    p = with_images(create_seq(24, max_tokens=2, first_token=300), (2, 20))
    sched.add(p)
    got = steady_decodes(sched, p, 60, arrivals=2)
    # The three oldest decodes end at steps 8, 10 and 12 (10, 12 and 14 tokens), each slot at once
    # refilled by a new request; at step 13 the 4 older ones left 20 tokens: the image, then its
    # prompt's last 2 tokens at 14.
    assert got == 14
