"""A request whose step raises fails alone: the other requests of its batch get the tokens they get
alone and the engine goes on. Covered: a request's own state the sampler cannot prepare (a seed no
generator takes, a grammar that cannot be built), an error the engine pins on one request by running
each alone, both with and without async scheduling; parameters a step would fail on are refused at
admission; only a failure even a one-token probe step hits stops the engine."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from sloth_serve.config import Config
from sloth_serve.engine.async_engine import AsyncEngine
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams, StructuredSpec
from sloth_serve.engine.sequence import FinishReason
from sloth_serve.loader import DEMO_MODEL

SEEDED = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
GOOD_PROMPT = [5, 17, 99, 3]


def make(async_scheduling: bool = False) -> LLMEngine:
    return LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64, block_size=8,
                            async_scheduling=async_scheduling))


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return make()


def run(engine: LLMEngine, poison: dict[str, SamplingParams] | None = None,
        requests: dict[str, SamplingParams] | None = None) -> dict[str, tuple[list[int], FinishReason | None, str | None]]:
    """Run `requests` (id -> params) to the end; `poison` swaps a request's params after admission,
    as if validation had missed it. Returns id -> (tokens, finish reason, error)."""
    requests = requests or {"good": SEEDED}
    for i, (rid, params) in enumerate(requests.items()):
        engine.add_request(rid, GOOD_PROMPT if rid == "good" else [40 + i, 41, 42], params)
    for rid, params in (poison or {}).items():
        engine.seqs[rid].params = params
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    ends: dict[str, tuple[FinishReason | None, str | None]] = {}
    for _ in range(200):
        if not engine.has_unfinished_requests:
            break
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                ends[out.request_id] = (out.finish_reason, out.error)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.seqs  # failed requests freed their blocks
    return {rid: (got[rid], *ends[rid]) for rid in requests}


@pytest.fixture(scope="module")
def alone(engine: LLMEngine) -> list[int]:
    tokens, reason, _ = run(engine)["good"]
    assert reason is FinishReason.LENGTH and len(tokens) == 10
    return tokens


def test_a_seed_no_generator_takes_fails_only_its_request(engine: LLMEngine, alone: list[int]) -> None:
    bad = dataclasses.replace(SEEDED, seed=2**64)  # past what torch.Generator.manual_seed takes
    result = run(engine, {"bad": bad}, {"good": SEEDED, "bad": SEEDED})
    assert result["good"] == (alone, FinishReason.LENGTH, None)
    tokens, reason, error = result["bad"]
    assert tokens == [] and reason is FinishReason.ERROR and "seed 18446744073709551616" in (error or "")


def test_a_grammar_that_cannot_be_built_fails_only_its_request(engine: LLMEngine, alone: list[int]) -> None:
    # Not compiled by the API, and this engine's sampler has no tokenizer to compile it with.
    structured = SamplingParams(max_tokens=10, structured=StructuredSpec('{"type": "object"}'))
    result = run(engine, requests={"good": SEEDED, "json": structured})
    assert result["good"] == (alone, FinishReason.LENGTH, None)
    assert result["json"][1] is FinishReason.ERROR and "structured output failed" in (result["json"][2] or "")


def test_an_error_the_step_does_not_attribute_is_pinned_on_its_request(engine: LLMEngine, alone: list[int]) -> None:
    """A step raising for a reason nobody foresaw: each sequence runs alone, the one that fails alone
    fails, the others keep their tokens (the same as alone)."""
    real_run = engine.runner.run

    def run_failing_on_bad(batch, on_launched=None):  # type: ignore[no-untyped-def]
        if any(seq.request_id == "bad" and seq.num_output_tokens >= 2 for seq in batch.seqs):
            raise RuntimeError("kernel rejects this shape")
        return real_run(batch, on_launched)

    engine.runner.run = run_failing_on_bad  # type: ignore[method-assign]
    try:
        result = run(engine, requests={"good": SEEDED, "bad": GREEDY, "other": GREEDY})
    finally:
        del engine.runner.run
    assert result["good"] == (alone, FinishReason.LENGTH, None)
    assert result["other"][1] is FinishReason.LENGTH and len(result["other"][0]) == 10
    tokens, reason, error = result["bad"]
    assert reason is FinishReason.ERROR and "kernel rejects this shape" in (error or "") and len(tokens) == 2
    assert run(engine)["good"][0] == alone  # the engine goes on


def test_with_async_scheduling_a_bad_seed_fails_only_its_request(alone: list[int]) -> None:
    engine = make(async_scheduling=True)
    bad = dataclasses.replace(SEEDED, seed=-(2**63) - 1)
    result = run(engine, {"bad": bad}, {"good": SEEDED, "bad": SEEDED})
    assert result["good"] == (alone, FinishReason.LENGTH, None)
    assert result["bad"][1] is FinishReason.ERROR and "seed" in (result["bad"][2] or "")


@pytest.mark.parametrize("fields", [
    {"seed": 2**64}, {"seed": -1}, {"temperature": float("nan")}, {"repetition_penalty": float("inf")},
    {"logit_bias": {4096: 1.0}}, {"logit_bias": {-1: 1.0}}, {"logit_bias": {5: float("nan")}},
    {"stop_token_ids": (70000,), "min_tokens": 1},
])
def test_parameters_a_step_would_fail_on_are_refused_at_admission(engine: LLMEngine, fields: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        engine.add_request("refused", [1, 2, 3], SamplingParams(max_tokens=4, **fields))
    assert "refused" not in engine.seqs and not engine.has_unfinished_requests


def test_a_failure_even_a_probe_step_hits_stops_the_engine(engine: LLMEngine) -> None:
    """Every sequence failing alone, and a one-token probe failing too: the engine's own fault."""

    def broken(batch, on_launched=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("weights gone")

    engine.runner.run = broken  # type: ignore[method-assign]

    async def main() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            stream = ae.add_request("r", [1, 2, 3], GREEDY)
            out = await asyncio.wait_for(stream.get(), 30)
            assert out.finished and out.finish_reason is FinishReason.ERROR
            assert ae.dead_reason is not None and "RuntimeError" in ae.dead_reason
        finally:
            await ae.stop()

    try:
        asyncio.run(main())
    finally:
        del engine.runner.run


def test_through_the_async_engine_the_others_stream_on(alone: list[int]) -> None:
    engine = make()
    real_add = engine.add_request

    def add_then_poison(request_id, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_add(request_id, *args, **kwargs)
        if request_id == "bad":
            engine.seqs[request_id].params = dataclasses.replace(SEEDED, seed=2**64)

    engine.add_request = add_then_poison  # type: ignore[method-assign]

    async def drain(stream: asyncio.Queue) -> tuple[list[int], object]:
        tokens: list[int] = []
        while True:
            out = await asyncio.wait_for(stream.get(), 30)
            tokens += out.new_token_ids
            if out.finished:
                return tokens, out

    async def main() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            good = ae.add_request("good", GOOD_PROMPT, SEEDED)
            doomed = ae.add_request("bad", [40, 41, 42], SEEDED)
            (tokens, last), (_, failed) = await asyncio.gather(drain(good), drain(doomed))
            assert failed.finish_reason is FinishReason.ERROR and "seed" in failed.error  # type: ignore[attr-defined]
            assert tokens == alone and last.finish_reason is FinishReason.LENGTH  # type: ignore[attr-defined]
            assert ae.dead_reason is None
            assert (await drain(ae.add_request("after", GOOD_PROMPT, SEEDED)))[0] == alone
        finally:
            await ae.stop()

    asyncio.run(main())
