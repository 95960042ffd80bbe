"""The threaded engine loop: streams get exactly their tokens, a client abort frees blocks, an
out-of-memory step fails only its requests, and any other failure ends every stream with an error."""

from __future__ import annotations

import asyncio

import pytest
import torch

from sloth_serve.config import Config
from sloth_serve.engine.async_engine import AsyncEngine
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.engine.sequence import FinishReason
from sloth_serve.loader import DEMO_MODEL

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture()
def engine() -> LLMEngine:
    return LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64))


async def collect(async_engine: AsyncEngine, request_id: str, prompt: list[int]) -> tuple[list[int], object]:
    tokens: list[int] = []
    stream = async_engine.add_request(request_id, prompt, PARAMS)
    while True:
        last = await stream.get()
        tokens += last.new_token_ids
        if last.finished:
            return tokens, last


def test_streams_get_their_own_tokens_and_aborts_free_blocks(engine: LLMEngine) -> None:
    async def main() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            results = await asyncio.gather(*(collect(ae, f"r{i}", [10 + i, 20, 30]) for i in range(4)))
            assert all(len(tokens) == 8 for tokens, _ in results)
            stream = ae.add_request("gone", [5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True))
            await stream.get()
            ae.abort("gone")
            while True:
                out = await stream.get()
                if out.finished:
                    break
            assert out.finish_reason is FinishReason.ABORT
            await asyncio.sleep(0.05)
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        finally:
            await ae.stop()

    asyncio.run(main())


def test_out_of_memory_fails_that_steps_requests_and_the_engine_goes_on(engine: LLMEngine) -> None:
    real_run = engine.runner.run
    calls = {"n": 0}

    def flaky(batch, on_launched=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(batch, on_launched)

    engine.runner.run = flaky  # type: ignore[method-assign]

    async def main() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            _, last = await collect(ae, "victim", [1, 2, 3])
            assert last.finish_reason is FinishReason.ERROR and "out of device memory" in last.error
            tokens, last = await collect(ae, "after", [1, 2, 3])
            assert len(tokens) == 8 and last.finish_reason is FinishReason.LENGTH
            assert ae.dead_reason is None
        finally:
            await ae.stop()

    asyncio.run(main())


def test_other_failures_end_every_stream_and_mark_the_engine_dead(engine: LLMEngine) -> None:
    def broken(batch, on_launched=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("illegal memory access")

    engine.runner.run = broken  # type: ignore[method-assign]

    async def main() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            outs = await asyncio.gather(*(collect(ae, f"r{i}", [1, 2, 3]) for i in range(3)))
            assert all(last.finish_reason is FinishReason.ERROR for _, last in outs)
            assert ae.dead_reason is not None
        finally:
            await ae.stop()

    asyncio.run(main())


def test_a_steps_outputs_are_handed_over_when_the_next_step_is_launched(engine: LLMEngine) -> None:
    """The launch hook runs once per step (prefill, decode, empty, failed); the async engine hands
    step N's outputs to the event loop in step N+1's hook, and the last ones when it goes idle."""
    hooks: list[int] = []

    def hook() -> None:
        hooks.append(len(engine.scheduler.running))

    engine.add_request("a", [1, 2, 3], PARAMS)
    for _ in range(3):
        before = len(hooks)
        engine.step(on_launched=hook)
        assert len(hooks) == before + 1
    engine.abort("a")
    engine.step(on_launched=hook)  # nothing to run: the hook still runs once
    assert len(hooks) == 4

    real_run = engine.runner.run
    delivered_at_launch: list[int] = []
    outputs_seen: list[int] = []

    def watched(batch, on_launched=None):  # type: ignore[no-untyped-def]
        def launched() -> None:
            delivered_at_launch.append(len(outputs_seen))
            if on_launched is not None:
                on_launched()

        return real_run(batch, launched)

    engine.runner.run = watched  # type: ignore[method-assign]

    async def main() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            stream = ae.add_request("b", [4, 5, 6], PARAMS)
            while True:
                out = await stream.get()
                outputs_seen.append(len(out.new_token_ids))
                if out.finished:
                    break
        finally:
            await ae.stop()

    asyncio.run(main())
    assert sum(outputs_seen) == 8  # every token arrived, the last output too (handed over when idle)
    # Each step's hook fires before the previous step's output reached the stream: 8 steps, and at
    # the launch of step k the stream has seen at most the outputs of steps before k - 1.
    assert len(delivered_at_launch) == 8
    assert all(seen <= max(k - 1, 0) for k, seen in enumerate(delivered_at_launch))


def test_the_observer_sees_every_step_once_with_its_end_time(engine: LLMEngine) -> None:
    """Under the async engine the metrics of a step are recorded at the next step's launch (or when
    the engine goes idle), each with the time its step ended; none is lost or counted twice."""
    import time

    seen: list[tuple[int, float, float]] = []

    class Recorder:
        def on_step(self, scheduler, batch, outputs, forward_seconds, now) -> None:  # type: ignore[no-untyped-def]
            seen.append((sum(len(o.new_token_ids) for o in outputs), now, time.monotonic()))

    engine.observer = Recorder()

    async def main() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            results = await asyncio.gather(*(collect(ae, f"o{i}", [3 + i, 4, 5]) for i in range(3)))
            assert all(len(tokens) == 8 for tokens, _ in results)
        finally:
            await ae.stop()

    asyncio.run(main())
    assert engine.defer_observation and not engine._unobserved
    assert sum(n for n, _, _ in seen) == 24
    assert all(now <= called for _, now, called in seen)
    assert [now for _, now, _ in seen] == sorted(now for _, now, _ in seen)


def test_a_failing_metrics_call_costs_no_request_its_outputs(engine: LLMEngine) -> None:
    class Broken:
        def on_step(self, scheduler, batch, outputs, forward_seconds, now) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("metrics backend down")

    engine.observer = Broken()

    async def main() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            results = await asyncio.wait_for(asyncio.gather(*(collect(ae, f"m{i}", [6 + i, 7]) for i in range(3))), 30)
            assert all(len(tokens) == 8 and last.finish_reason is FinishReason.LENGTH for tokens, last in results)
        finally:
            await ae.stop()

    asyncio.run(main())
