"""The engine in a thread of this process, behind the EngineClient interface: the asyncio event
loop never waits on the model. Commands cross to the engine thread through a thread-safe queue
(server/engine/engine_loop.py), each delivery comes back with one `call_soon_threadsafe`. The offline
`LLM` and `--engine-mode thread` use it; the server's default is the engine process."""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
from collections.abc import Callable

from .client import EngineClient, EngineDeadError, fail_calls, resolve_call
from .engine_loop import EngineLoop, engine_info
from .llm_engine import LLMEngine
from .mm_inputs import MultiModalInputs
from .outputs import EngineInfo
from .sampling_params import SamplingParams
from .sequence import FinishReason
from .wire import (
    Abort,
    AddLora,
    AddRequest,
    Dead,
    Event,
    RemoveLora,
    Reply,
    Shutdown,
    StepOutputs,
)

# The engine thread and the event loop share the GIL, which CPython hands over only once a switch
# interval (5 ms by default) has passed. An engine thread back from a GPU wait could sit that long
# while the event loop streams tokens, with the GPU idle; a shorter interval bounds that wait.
SWITCH_INTERVAL_S = 0.0005


class AsyncEngine(EngineClient):
    """`engine`: a built engine, or a function that builds one (run in a worker thread by start)."""

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        super().__init__()
        self._build = engine if not isinstance(engine, LLMEngine) else None
        self.engine: LLMEngine | None = engine if isinstance(engine, LLMEngine) else None
        self.core: EngineLoop | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._calls: dict[int, asyncio.Future[int | None]] = {}
        self._call_ids = itertools.count()

    @property
    def is_running(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.dead_reason is None

    async def start(self) -> EngineInfo:
        self.loop = asyncio.get_running_loop()
        if self.engine is None:
            assert self._build is not None
            self.engine = await asyncio.to_thread(self._build)
        self.core = EngineLoop(self.engine, self._send)
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.thread = threading.Thread(target=self.core.run, name="sloth-engine", daemon=True)
        self.thread.start()
        info = engine_info(self.engine)
        self.stats = info.initial_stats(self.loop.time())
        return info

    async def stop(self) -> None:
        if self.core is not None and self.thread is not None:
            self.core.put(Shutdown())
            await asyncio.to_thread(self.thread.join, 10)

    def _send_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: int,
                  eos_token_ids: frozenset[int] | None, mm: MultiModalInputs | None, system_prompt_end: int) -> None:
        assert self.core is not None
        self.core.put(AddRequest(request_id, prompt_token_ids, params, adapter_id, eos_token_ids, mm, system_prompt_end))

    def _send_abort(self, request_id: str, reason: FinishReason) -> None:
        assert self.core is not None
        self.core.put(Abort(request_id, reason))

    async def add_lora(self, adapter_id: int, name: str, path: str, shared: bool = False) -> int:
        call_id, future = self._new_call()  # one front end: `shared` changes nothing
        assert self.core is not None
        await asyncio.to_thread(self.core.load_lora, AddLora(call_id, adapter_id, name, str(path)))
        rank = await future
        assert rank is not None
        return rank

    async def remove_lora(self, adapter_id: int) -> None:
        call_id, future = self._new_call()
        assert self.core is not None
        self.core.put(RemoveLora(call_id, adapter_id))
        await future

    def _new_call(self) -> tuple[int, asyncio.Future[int | None]]:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        assert self.loop is not None
        call_id = next(self._call_ids)
        future = self._calls[call_id] = self.loop.create_future()
        return call_id, future

    # --- engine thread -> event loop ----------------------------------------------------------

    def _send(self, event: Event) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._receive, event)

    def _receive(self, event: Event) -> None:
        if isinstance(event, StepOutputs):
            self._on_outputs(event)
        elif isinstance(event, Reply):
            resolve_call(self._calls, event)
        elif isinstance(event, Dead):
            self._die(event.reason, event.outputs)
            fail_calls(self._calls, event.reason)
