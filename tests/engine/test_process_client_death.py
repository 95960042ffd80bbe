"""The engine process dies and a request reaches the front end before its event loop has run the
death's handler (the process's sentinel callback): the command socket has no peer any more, and a
send on it used to block the event loop for good, so no stream ever ended and the server never
exited. The send now fails at once and the death is handled there: the request gets EngineDeadError,
every open stream its error output, and the reason names the signal."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from sloth_serve.config import Config
from sloth_serve.engine.client import EngineDeadError
from sloth_serve.engine.process_client import ProcessEngineClient
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.engine.sequence import FinishReason
from sloth_serve.loader import DEMO_MODEL

DEADLINE_S = 20.0  # a blocked send would hold the worker thread past it


def test_a_request_in_the_moment_after_the_engine_died_fails_at_once_and_ends_the_open_streams() -> None:
    async def run() -> None:
        client = ProcessEngineClient(Config(model=str(DEMO_MODEL), device="cpu", load_format="safetensors",
                                            num_kv_blocks=64))
        try:
            await client.start()
            assert client.process is not None and client.process.pid is not None
            open_stream = client.add_request("open", [1, 2, 3], SamplingParams(max_tokens=1000, ignore_eos=True))
            os.kill(client.process.pid, signal.SIGKILL)
            # The loop does not run meanwhile (this thread sleeps in it): the process ends and its
            # connection closes, but the sentinel callback that would notice has not run yet.
            deadline = time.monotonic() + 10
            while Path(f"/proc/{client.process.pid}/stat").exists() and time.monotonic() < deadline:
                stat = Path(f"/proc/{client.process.pid}/stat").read_text()
                if stat.split(") ", 1)[1].startswith("Z"):
                    break  # a zombie: dead, not yet reaped
                time.sleep(0.05)
            time.sleep(0.5)  # ZeroMQ's I/O thread drops the closed connection
            raised: list[BaseException] = []

            def request() -> None:
                try:
                    client.add_request("late", [1, 2, 3], SamplingParams(max_tokens=4))
                except BaseException as exc:  # what the request got
                    raised.append(exc)

            worker = threading.Thread(target=request, daemon=True)  # blocked forever before the fix
            worker.start()
            worker.join(DEADLINE_S)
            assert not worker.is_alive(), "the send blocked: the event loop would have stopped for good"
            assert len(raised) == 1 and isinstance(raised[0], EngineDeadError), raised
            assert client.dead_reason is not None and "killed by SIGKILL" in client.dead_reason
            out = open_stream.get_nowait()
            while not out.finished:
                out = open_stream.get_nowait()
            assert out.finish_reason is FinishReason.ERROR and "killed by SIGKILL" in (out.error or "")
            with pytest.raises(EngineDeadError):  # and every later one, as before
                client.add_request("later", [1, 2, 3], SamplingParams(max_tokens=4))
        finally:
            await client.stop()

    asyncio.run(run())
