"""Two front ends' adapter registries (server/api/runtime.py) through the real ClientRouter, with a
stand-in for the engine's adapter table (what it holds by id; only ids cross here): a shared adapter
named while a front end loads the same name on a request stays served everywhere, and news of a
shared adapter that a front end has since replaced by its own is dropped; a --lora adapter unloaded
through a serving front end before a starting one loads it is not loaded again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sloth_serve.adapters import AdapterRegistry, dynamic_ids_from
from sloth_serve.api.runtime import Runtime
from sloth_serve.engine.client import AdapterWithdrawnError, resolve_call
from sloth_serve.engine.client_router import ClientRouter
from sloth_serve.engine.wire import AdapterNamed, AdapterUnnamed, AddLora, RemoveLora, Reply
from sloth_serve.loader import DEMO_ADAPTER


class Tokenizers:
    """Reading an adapter folder's tokenizer takes `seconds[i]` the i-th time (then no time)."""

    def __init__(self, seconds: tuple[float, ...] = ()) -> None:
        self.seconds = list(seconds)

    def prepare(self, path: str, name: str) -> object:
        if self.seconds:
            time.sleep(self.seconds.pop(0))
        return object()

    def put(self, adapter_id: int, tokenizer: object) -> None:
        pass


class Engine:
    """Adapter calls through the router; `held` is the engine's adapter table, `news` each front
    end's queue of what the router told it. A load of a name in `slow` takes 0.3 s."""

    def __init__(self, router: ClientRouter, index: int, held: set[int], news: dict[int, asyncio.Queue[Any]],
                 slow: tuple[str, ...] = ()) -> None:
        self.router, self.index, self.held, self.news, self.slow = router, index, held, news, slow
        self.calls = 0

    async def _call(self, command: AddLora | RemoveLora, seconds: float) -> int | None:
        sent, answers = self.router.command(self.index, command)
        if sent is None:  # answered by the router: its error, as the front end's client raises it
            refused: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
            reply = answers[0][1]
            assert isinstance(reply, Reply)
            resolve_call({reply.call_id: refused}, reply)
            return await refused
        await asyncio.sleep(seconds)
        if isinstance(sent, AddLora):
            self.held.add(sent.adapter_id)
        else:
            self.held.discard(sent.adapter_id)
        result = None
        for client, event in self.router.event(Reply(sent.call_id, result=16 if isinstance(sent, AddLora) else None)):
            if isinstance(event, Reply):
                result = event.result
            else:
                self.news[client].put_nowait(event)
        return result

    async def add_lora(self, adapter_id: int, name: str, path: str, shared: bool = False) -> int | None:
        self.calls += 1
        return await self._call(AddLora(self.calls, adapter_id, name, path, shared), 0.3 if name in self.slow else 0.01)

    async def remove_lora(self, adapter_id: int) -> None:
        self.calls += 1
        await self._call(RemoveLora(self.calls, adapter_id), 0.01)


async def front_ends(slow: dict[int, tuple[str, ...]], reads: dict[int, tuple[float, ...]] | None = None,
                     ) -> tuple[list[Runtime], set[int], ClientRouter, list[Any]]:
    router, held = ClientRouter(2), set[int]()
    news: dict[int, asyncio.Queue[Any]] = {0: asyncio.Queue(), 1: asyncio.Queue()}
    runtimes = [Runtime(Engine(router, i, held, news, slow.get(i, ())), None, None,  # type: ignore[arg-type]
                        AdapterRegistry((str(DEMO_ADAPTER.parent),), dynamic_ids=dynamic_ids_from(i)),
                        None, "base", Tokenizers((reads or {}).get(i, ())))  # type: ignore[arg-type]
                for i in (0, 1)]

    async def read(i: int) -> None:  # as ServerState._read_adapter_news
        while True:
            event = await news[i].get()
            if isinstance(event, AdapterNamed):
                await runtimes[i].adopt_adapter(event)
            else:
                assert isinstance(event, AdapterUnnamed)
                runtimes[i].forget_adapter(event)

    return runtimes, held, router, [asyncio.create_task(read(i)) for i in (0, 1)]


def served(runtime: Runtime) -> dict[str, int]:
    return {name: adapter.adapter_id for name, adapter in runtime.adapters.by_name.items()}


def test_a_load_on_a_request_finishing_after_a_shared_load_was_adopted_gives_way() -> None:
    async def run() -> None:
        (fe0, fe1), held, router, readers = await front_ends({1: ("foo",)})
        # Front end 1 loads --lora-dir's "foo" for a request (slow); front end 0 loads it through
        # /v1/load_lora_adapter meanwhile, and front end 1 adopts that one before its own is read.
        own = asyncio.create_task(fe1.load_adapter("foo", str(DEMO_ADAPTER), pinned=False))
        await asyncio.sleep(0.01)
        shared = await fe0.load_adapter("foo", str(DEMO_ADAPTER), pinned=True)
        assert (await own).adapter_id == shared.adapter_id  # the request is served by the shared one
        await asyncio.sleep(0.1)
        assert served(fe0) == served(fe1) == {"foo": shared.adapter_id}
        assert held == {shared.adapter_id} and router.shared == {"foo": shared.adapter_id}
        for reader in readers:
            reader.cancel()

    asyncio.run(run())


def test_news_of_an_adapter_replaced_here_since_is_dropped() -> None:
    async def run() -> None:
        # Front end 1's first tokenizer read (adopting front end 0's adapter) is slow.
        (fe0, fe1), held, router, readers = await front_ends({}, {1: (0.4,)})
        first = await fe0.load_adapter("foo", str(DEMO_ADAPTER), pinned=True)
        await fe0.unload_adapter("foo")
        # Front end 1 loads the name itself while it still adopts front end 0's (gone by now).
        mine = await fe1.load_adapter("foo", str(DEMO_ADAPTER), pinned=True)
        await asyncio.sleep(0.5)
        await asyncio.sleep(0.1)
        assert mine.adapter_id != first.adapter_id
        assert served(fe0) == served(fe1) == {"foo": mine.adapter_id}
        assert held == {mine.adapter_id} and router.shared == {"foo": mine.adapter_id}
        for reader in readers:
            reader.cancel()

    asyncio.run(run())


def test_a_lora_adapter_unloaded_while_another_front_end_starts_stays_unloaded() -> None:
    async def run() -> None:
        (fe0, fe1), held, router, readers = await front_ends({})
        # Front end 0 has loaded its --lora adapter and serves; it is unloaded through it before
        # front end 1, still starting, loads the same --lora adapter.
        await fe0.load_adapter("foo", str(DEMO_ADAPTER), pinned=True, at_startup=True)
        await fe0.unload_adapter("foo")
        try:
            await fe1.load_adapter("foo", str(DEMO_ADAPTER), pinned=True, at_startup=True)
        except AdapterWithdrawnError:
            pass
        else:
            raise AssertionError("the unloaded --lora adapter was loaded again")
        await asyncio.sleep(0.1)
        assert served(fe0) == served(fe1) == {}
        assert held == set() and router.shared == {}
        for reader in readers:
            reader.cancel()

    asyncio.run(run())
