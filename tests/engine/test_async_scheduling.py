"""--async-scheduling: a decode step is queued before the host has read the previous step's tokens
(fed them on the device). On the demo model it must change nothing a client sees: the same tokens,
finish reasons and freed blocks as the synchronous engine, whatever ends the requests (max_tokens,
EOS, stop tokens, aborts) and whoever arrives meanwhile; requests that sample from their history
(penalties, logprobs, min_tokens) drop back to synchronous steps."""

from __future__ import annotations

import pytest
import torch

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_MODEL


def make(async_scheduling: bool) -> LLMEngine:
    return LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64, block_size=8,
                            max_num_batched_tokens=32, max_num_seqs=6, async_scheduling=async_scheduling))


def run(engine: LLMEngine, requests: list[tuple[int, list[int], SamplingParams]],
        aborts: dict[int, str] | None = None) -> dict[str, tuple[list[int], str | None]]:
    """requests: (arrival step, prompt, params); aborts: step -> request id to abort then."""
    got: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    step = 0
    pending = sorted(enumerate(requests), key=lambda r: r[1][0])
    while pending or engine.has_unfinished_requests:
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, params) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
            got[f"r{i}"] = []
        if aborts and step in aborts:
            engine.abort(aborts[step])
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason.value if out.finish_reason else None
        step += 1
        assert step < 2000
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.seqs
    return {rid: (tokens, reasons.get(rid)) for rid, tokens in got.items()}


PROMPTS = [[5, 17, 99, 3], [250, 7], [1000, 2000, 3000, 40, 41, 42, 43, 44, 45, 46, 47], [9], [77, 78, 79, 80, 81]]


def test_greedy_tokens_equal_the_synchronous_engine_under_staggered_arrivals() -> None:
    reqs = [(i * 3, p, SamplingParams(max_tokens=6 + 5 * i, temperature=0, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    reqs.append((20, [11, 12, 13], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)))
    sync, ahead = run(make(False), reqs), run(make(True), reqs)
    assert ahead == sync
    assert all(len(tokens) == r[2].max_tokens for (tokens, _), r in zip(sync.values(), reqs, strict=True))


def test_eos_and_stop_tokens_end_requests_the_same_way() -> None:
    # The demo model's own EOS ends some of these early; a stop token chosen from the synchronous run
    # ends another mid-way. Both are seen by the host a step after the token was computed.
    base = run(make(False), [(0, p, SamplingParams(max_tokens=40, temperature=0)) for p in PROMPTS])
    stop_at = base["r2"][0][5]
    reqs = [(0, p, SamplingParams(max_tokens=40, temperature=0)) for p in PROMPTS]
    reqs.append((2, PROMPTS[2], SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[stop_at])))
    sync, ahead = run(make(False), reqs), run(make(True), reqs)
    assert ahead == sync
    assert sync["r5"][1] == "stop" and sync["r5"][0][-1] == stop_at


def test_seeded_sampling_draws_the_same_tokens() -> None:
    reqs = [(i, p, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=100 + i))
            for i, p in enumerate(PROMPTS)]
    assert run(make(True), reqs) == run(make(False), reqs)


@pytest.mark.parametrize("abort_step", [3, 4, 7])
def test_an_abort_while_a_step_runs_ahead_frees_everything(abort_step: int) -> None:
    reqs = [(0, p, SamplingParams(max_tokens=15, temperature=0)) for p in PROMPTS[:3]]
    sync = run(make(False), reqs, {abort_step: "r1"})
    ahead = run(make(True), reqs, {abort_step: "r1"})
    assert ahead["r0"] == sync["r0"] and ahead["r2"] == sync["r2"]
    assert ahead["r1"][1] == "abort" and len(ahead["r1"][0]) < 15
    # what it did say is a prefix of what it says when left alone
    assert ahead["r1"][0] == run(make(False), [reqs[1]])["r0"][0][: len(ahead["r1"][0])]


def test_history_dependent_requests_run_synchronously_beside_the_others() -> None:
    reqs = [(0, PROMPTS[0], SamplingParams(max_tokens=10, temperature=0)),
            (1, PROMPTS[1], SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3)),
            (2, PROMPTS[2], SamplingParams(max_tokens=10, temperature=0, logprobs=2)),
            (6, PROMPTS[3], SamplingParams(max_tokens=10, temperature=0, min_tokens=5)),
            (12, PROMPTS[4], SamplingParams(max_tokens=10, temperature=0))]
    assert run(make(True), reqs) == run(make(False), reqs)


def test_steps_really_run_ahead() -> None:
    """The mechanism is in use: with only plain decoding requests, most steps are queued ahead."""
    engine = make(True)
    launched: list[bool] = []
    real = engine.runner.launch_decode

    def watch(batch, prev=None, prev_rows=None):  # type: ignore[no-untyped-def]
        launched.append(prev is not None)
        return real(batch, prev, prev_rows)

    engine.runner.launch_decode = watch  # type: ignore[method-assign]
    run(engine, [(0, p, SamplingParams(max_tokens=20, temperature=0)) for p in PROMPTS])
    assert sum(launched) >= 15


def test_a_token_budget_below_the_running_count_leaves_nobody_out() -> None:
    """More requests than the step's token budget: at every launch, every running request (bar those
    whose previous token is their last) is in the step (one left out would wait as long as steps run
    ahead), and the tokens are the synchronous engine's."""
    def engine(ahead: bool) -> LLMEngine:
        return LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64, block_size=8,
                                max_num_batched_tokens=3, max_num_seqs=6, async_scheduling=ahead))

    reqs = [(0, p[:3], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in PROMPTS]
    ahead = engine(True)
    left_out: list[int] = []
    real = ahead.runner.launch_decode

    def watch(batch, prev=None, prev_rows=None):  # type: ignore[no-untyped-def]
        # running requests not in the step, but for those whose token in the previous step is their last
        left_out.append(sum(1 for s in ahead.scheduler.running if s not in batch.seqs
                            and not (prev is not None and s.num_output_tokens + 1 >= s.params.max_tokens)))
        return real(batch, prev, prev_rows)

    ahead.runner.launch_decode = watch  # type: ignore[method-assign]
    assert run(ahead, reqs) == run(engine(False), reqs)
    assert left_out and not any(left_out)  # it ran ahead, and only with every running request


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_traffic_gets_the_synchronous_engines_answers(seed: int) -> None:
    """Random arrivals, lengths, sampling parameters (some history-dependent), stop tokens and
    aborts: with steps running ahead the outputs are the synchronous engine's."""
    import random

    rng = random.Random(seed)
    reqs = []
    for i in range(10):
        prompt = [rng.randrange(5, 4000) for _ in range(rng.randrange(1, 14))]
        kw: dict = dict(max_tokens=rng.randrange(1, 25), temperature=rng.choice([0.0, 0.0, 0.7]), seed=seed * 100 + i,
                        ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.2:
            kw["repetition_penalty"] = 1.2
        if rng.random() < 0.2:
            kw["stop_token_ids"] = [rng.randrange(5, 4000) for _ in range(50)]
        reqs.append((rng.randrange(0, 30), prompt, SamplingParams(**kw)))
    aborts = {rng.randrange(2, 40): f"r{rng.randrange(10)}" for _ in range(3)}
    ahead, sync = run(make(True), reqs, aborts), run(make(False), reqs, aborts)
    assert ahead.keys() == sync.keys()
    for rid in ahead:
        if rid in aborts.values():
            # An abort lands a step earlier in the request's output when steps run ahead (the host
            # has read one token fewer by then): one output is a prefix of the other.
            a, b = ahead[rid][0], sync[rid][0]
            assert a == b[: len(a)] or b == a[: len(b)], rid
        else:
            assert ahead[rid] == sync[rid], rid


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [True, False])
def test_on_gpu_running_ahead_gives_the_synchronous_tokens(graphs: bool) -> None:
    """On CUDA the step after is fed its input ids on the device (graph replay or eager) and the
    host staging buffers alternate; fp32 so that greedy choices are stable."""
    def engine(ahead: bool) -> LLMEngine:
        return LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=256, device="cuda",
                                dtype="float32", enforce_eager=not graphs, async_scheduling=ahead))

    reqs = [(i, p, SamplingParams(max_tokens=20 + i, temperature=0)) for i, p in enumerate(PROMPTS)]
    reqs += [(3, p, SamplingParams(max_tokens=16, temperature=0.8, seed=9, ignore_eos=True)) for p in PROMPTS]
    assert run(engine(True), reqs) == run(engine(False), reqs)


def test_a_full_server_keeps_running_ahead() -> None:
    """Requests waiting for a sequence slot (max_num_seqs reached) cannot start anyway: the running
    ones keep running ahead meanwhile, and every request gets the synchronous tokens."""
    def engine(ahead: bool) -> LLMEngine:
        return LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64, block_size=8,
                                max_num_seqs=2, async_scheduling=ahead))

    reqs = [(0, p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in PROMPTS[:4]]
    ahead = engine(True)
    chained: list[bool] = []
    real = ahead.runner.launch_decode

    def watch(batch, prev=None, prev_rows=None):  # type: ignore[no-untyped-def]
        if ahead.scheduler.waiting:
            chained.append(prev is not None)
        return real(batch, prev, prev_rows)

    ahead.runner.launch_decode = watch  # type: ignore[method-assign]
    assert run(ahead, reqs) == run(engine(False), reqs)
    assert sum(chained) >= 8  # while two requests waited, steps still ran ahead


def test_each_steps_forward_time_is_recorded_once() -> None:
    engine = make(True)
    forwards = [0]
    real = engine.runner._forward

    def counted(inputs):  # type: ignore[no-untyped-def]
        forwards[0] += 1
        return real(inputs)

    engine.runner._forward = counted  # type: ignore[method-assign]
    recorded: list[float] = []

    class Recorder:
        def on_step(self, scheduler, batch, outputs, forward_seconds, now) -> None:  # type: ignore[no-untyped-def]
            if forward_seconds is not None:
                recorded.append(forward_seconds)

    engine.observer = Recorder()
    run(engine, [(i, p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)) for i, p in enumerate(PROMPTS)])
    assert len(recorded) == forwards[0] > 0


def test_the_first_adapters_warmup_is_not_counted_as_traffic() -> None:
    """add_lora runs the warmup through the first adapter on CUDA (forced here on the CPU): none of
    those requests reaches the observer (the metrics and the request log)."""
    from sloth_serve.loader import DEMO_ADAPTER
    from sloth_serve.loader.peft import load_lora

    engine = make(False)
    seen: list[int] = []

    class Recorder:
        def on_step(self, scheduler, batch, outputs, forward_seconds, now) -> None:  # type: ignore[no-untyped-def]
            seen.append(len(outputs))

    engine.observer = Recorder()
    engine.device = torch.device("cuda")  # only the warmup's condition reads it after construction
    engine.add_lora(1, load_lora("upper", DEMO_ADAPTER, engine.config.max_lora_rank))
    assert not seen and not engine.has_unfinished_requests and isinstance(engine.observer, Recorder)


def test_out_of_memory_in_a_step_run_ahead_fails_its_requests_and_the_engine_goes_on() -> None:
    import asyncio

    from sloth_serve.engine.async_engine import AsyncEngine
    from sloth_serve.engine.sequence import FinishReason

    engine = make(True)
    real = engine.runner.launch_decode
    calls = [0]

    def flaky(batch, prev=None, prev_rows=None):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 3:  # a step queued ahead of an unread one
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch, prev, prev_rows)

    engine.runner.launch_decode = flaky  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def collect(ae: AsyncEngine, rid: str) -> tuple[list[int], object]:
        tokens: list[int] = []
        stream = ae.add_request(rid, [3, 4, 5], params)
        while True:
            last = await stream.get()
            tokens += last.new_token_ids
            if last.finished:
                return tokens, last

    async def main() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            _, last = await asyncio.wait_for(collect(ae, "victim"), 30)
            assert last.finish_reason is FinishReason.ERROR and "out of device memory" in last.error  # type: ignore[attr-defined]
            tokens, last = await asyncio.wait_for(collect(ae, "after"), 30)
            assert len(tokens) == 8 and last.finish_reason is FinishReason.LENGTH  # type: ignore[attr-defined]
        finally:
            await ae.stop()

    asyncio.run(main())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_scored_prompts_last_token_alone_keeps_its_prompt_logprob() -> None:
    """A prompt of 33 tokens with a budget of 32: its last token is a step alone, a prefill (scored on
    the eager path), never run ahead as a decode, which would leave its prompt logprob out."""
    prompt = [(7 * i) % 900 + 5 for i in range(33)]
    scored = {}
    for ahead in (False, True):
        engine = make(ahead)
        for params in (SamplingParams(max_tokens=0, prompt_logprobs=1), SamplingParams(max_tokens=3, prompt_logprobs=0,
                                                                                       temperature=0)):
            engine.add_request("r", prompt, params)
            lps = None
            while engine.has_unfinished_requests:
                for out in engine.step():
                    lps = out.prompt_logprobs if out.prompt_logprobs is not None else lps
            assert lps is not None and len(lps) == len(prompt) - 1
            scored[ahead, params.max_tokens] = [round(lp.logprob, 4) for lp in lps]
    assert scored[True, 0] == scored[False, 0] and scored[True, 3] == scored[False, 3]
