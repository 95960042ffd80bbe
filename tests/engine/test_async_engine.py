"""The threaded engine loop: streams get exactly their tokens, a client abort frees blocks, an
out-of-memory step fails only its requests, and any other failure ends every stream with an error."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.config import Config
from server.engine.async_engine import AsyncEngine
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import FinishReason
from server.loader import DEMO_MODEL

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture()
def engine() -> LLMEngine:
    return LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64))


async def collect(async_engine: AsyncEngine, request_id: str, prompt: list[int]) -> tuple[list[int], object]:
    tokens: list[int] = []
    last = None
    async for out in async_engine.generate(request_id, prompt, PARAMS):
        tokens += out.new_token_ids
        last = out
    return tokens, last


def test_streams_get_their_own_tokens_and_aborts_free_blocks(engine: LLMEngine) -> None:
    async def main() -> None:
        ae = AsyncEngine(engine)
        ae.start()
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
            ae.shutdown()

    asyncio.run(main())


def test_out_of_memory_fails_that_steps_requests_and_the_engine_goes_on(engine: LLMEngine) -> None:
    real_run = engine.runner.run
    calls = {"n": 0}

    def flaky(batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(batch)

    engine.runner.run = flaky  # type: ignore[method-assign]

    async def main() -> None:
        ae = AsyncEngine(engine)
        ae.start()
        try:
            _, last = await collect(ae, "victim", [1, 2, 3])
            assert last.finish_reason is FinishReason.ERROR and "out of device memory" in last.error
            tokens, last = await collect(ae, "after", [1, 2, 3])
            assert len(tokens) == 8 and last.finish_reason is FinishReason.LENGTH
            assert ae.dead_reason is None
        finally:
            ae.shutdown()

    asyncio.run(main())


def test_other_failures_end_every_stream_and_mark_the_engine_dead(engine: LLMEngine) -> None:
    def broken(batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("illegal memory access")

    engine.runner.run = broken  # type: ignore[method-assign]

    async def main() -> None:
        ae = AsyncEngine(engine)
        ae.start()
        try:
            outs = await asyncio.gather(*(collect(ae, f"r{i}", [1, 2, 3]) for i in range(3)))
            assert all(last.finish_reason is FinishReason.ERROR for _, last in outs)
            assert ae.dead_reason is not None
        finally:
            ae.shutdown()

    asyncio.run(main())
