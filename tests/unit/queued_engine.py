"""An EngineClient whose outputs a test scripts: a subclass's `_send_add` builds each request's
outputs and hands them to `release`, which queues one once the reader took the one before (so a
stream gets several deltas). Nothing else of an engine is there."""

from __future__ import annotations

import asyncio
from typing import Any

from sloth_serve.engine.client import EngineClient, FinishReason, RequestOutput


class QueuedEngine(EngineClient):
    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[asyncio.Task[None]] = []

    def release(self, request_id: str, outputs: list[RequestOutput]) -> None:
        self.tasks.append(asyncio.create_task(self._release(self.streams[request_id], outputs)))

    async def _release(self, stream: asyncio.Queue[RequestOutput], outputs: list[RequestOutput]) -> None:
        for out in outputs:
            while not stream.empty():
                await asyncio.sleep(0)
            stream.put_nowait(out)

    def _send_abort(self, request_id: str, reason: FinishReason) -> None:
        self.streams.pop(request_id, None)

    async def start(self) -> Any:
        raise NotImplementedError

    async def stop(self) -> None:
        pass

    async def add_lora(self, adapter_id: int, name: str, path: str, shared: bool = False) -> int:
        raise NotImplementedError

    async def remove_lora(self, adapter_id: int) -> None:
        raise NotImplementedError
