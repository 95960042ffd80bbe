"""A request that finished in time is not reported as timed out because its reader woke late."""

from __future__ import annotations

import asyncio

import pytest

from sloth_serve.api.choice_stream import Deadline, DeadlineExceeded, _next_outputs
from sloth_serve.engine.llm_engine import RequestOutput
from sloth_serve.engine.sequence import FinishReason


def test_finished_output_queued_before_the_deadline_is_delivered() -> None:
    async def run() -> list[RequestOutput]:
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        stream.put_nowait(RequestOutput("r", [5], False))
        stream.put_nowait(RequestOutput("r", [6], True, FinishReason.LENGTH))
        past = Deadline(asyncio.get_running_loop().time() - 1.0, 0.5)
        return await _next_outputs(stream, past)

    outputs = asyncio.run(run())
    assert [o.new_token_ids for o in outputs] == [[5], [6]] and outputs[-1].finished


def test_unfinished_request_past_its_deadline_times_out() -> None:
    async def run() -> None:
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        stream.put_nowait(RequestOutput("r", [5], False))
        await _next_outputs(stream, Deadline(asyncio.get_running_loop().time() - 1.0, 0.5))

    with pytest.raises(DeadlineExceeded):
        asyncio.run(run())
