"""One engine process, several front ends (--api-server-count): which front end each request and
adapter call came from, so that every output and reply goes back to its sender alone. Pure
bookkeeping over the wire messages (no sockets), used by the engine process's command and event
threads under one lock."""

from __future__ import annotations

import itertools

import msgspec

from .outputs import RequestOutput
from .sequence import FinishReason
from .wire import (
    Abort,
    AdapterNamed,
    AdapterUnnamed,
    AddLora,
    AddRequest,
    Command,
    Dead,
    Event,
    RemoveLora,
    Reply,
    Shutdown,
    StepOutputs,
)

Routed = list[tuple[int, Event]]  # (front end index, event for it)


class ClientRouter:
    """Front ends are numbered 0..num_clients-1. A request id belongs to the front end that added it
    until its last output; call ids are each front end's own count, so they are renumbered on the way
    in and given back on the way out. Step records (StepStats) go to every front end: each answers
    /health and the gauges itself. A shared adapter (--lora, /v1/load_lora_adapter) has one name for
    all: once loaded or unloaded through one front end, the others are told (AdapterNamed,
    AdapterUnnamed), and a name held by another adapter is refused."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.owners: dict[str, int] = {}  # request id -> front end, while the request runs
        # engine call id -> (front end, its call id, the adapter call, whether it names a new shared adapter)
        self._calls: dict[int, tuple[int, int, AddLora | RemoveLora, bool]] = {}
        self.shared: dict[str, int] = {}  # shared adapter name -> its id (loaded, or loading)
        # Ids of shared adapters unloaded (or being unloaded): a front end still starting may yet ask
        # for its --lora adapters under them (ids are never given twice otherwise), and must not load
        # one again.
        self._unloaded: set[int] = set()
        self._call_ids = itertools.count()
        self._stopped: set[int] = set()  # front ends that sent Shutdown

    def command(self, client: int, command: Command) -> tuple[Command | None, Routed]:
        """A front end's command as the engine should see it (None: nothing for the engine), and what
        to answer that front end at once (a request id another front end is using)."""
        if isinstance(command, AddRequest):
            owner = self.owners.setdefault(command.request_id, client)
            if owner != client:
                error = f"request id {command.request_id!r} is in use by another API server"
                return None, [(client, StepOutputs([RequestOutput(command.request_id, [], True, FinishReason.ERROR,
                                                                  error=error)]))]
            return command, []
        if isinstance(command, Abort):  # a front end ends only its own requests
            return (command if self.owners.get(command.request_id) == client else None), []
        if isinstance(command, AddLora | RemoveLora):
            new_name = False
            if isinstance(command, AddLora) and command.shared:
                if command.adapter_id in self._unloaded:
                    error = (f"adapter {command.name!r} was unloaded through another API server while this one "
                             "was starting")
                    return None, [(client, Reply(command.call_id, error=error, is_value_error=True, withdrawn=True))]
                new_name = command.name not in self.shared
                # Each front end loads the --lora adapters under the same ids: the same name and id twice
                # is one adapter (the engine holds it once), another id under a held name is refused.
                if self.shared.setdefault(command.name, command.adapter_id) != command.adapter_id:
                    error = f"an adapter named {command.name!r} is already loaded (through another API server)"
                    return None, [(client, Reply(command.call_id, error=error, is_value_error=True))]
            if isinstance(command, RemoveLora) and command.adapter_id in self.shared.values():
                # Withdrawn from now on: a --lora load under its id reaching the engine after this
                # removal would load it again (undone if the removal fails).
                self._unloaded.add(command.adapter_id)
            call_id = next(self._call_ids)
            self._calls[call_id] = (client, command.call_id, command, new_name)
            return msgspec.structs.replace(command, call_id=call_id), []
        assert isinstance(command, Shutdown)
        # The engine stops once every front end has stopped: the others may still be draining.
        self._stopped.add(client)
        return (command if len(self._stopped) == self.num_clients else None), []

    def event(self, event: Event) -> Routed:
        """The engine's event, split among the front ends it concerns. A front end that has sent
        Shutdown gets nothing more: it is gone, and a send to it would wait for it for good."""
        return [(client, part) for client, part in self._event(event) if client not in self._stopped]

    def _event(self, event: Event) -> Routed:
        if isinstance(event, StepOutputs):
            return [(client, StepOutputs(outputs, event.stats)) for client, outputs in self._split(event.outputs)
                    if outputs or event.stats]
        if isinstance(event, Reply):
            if event.call_id not in self._calls:
                return []
            client, call_id, command, new_name = self._calls.pop(event.call_id)
            reply = msgspec.structs.replace(event, call_id=call_id)
            news = self._adapter_news(command, new_name, event)
            return [(client, reply), *((other, told) for told in news for other in range(self.num_clients)
                                        if other != client)]
        if isinstance(event, Dead):  # every front end learns why; each gets its own requests' ends
            split = dict(self._split(event.outputs))
            return [(client, Dead(event.reason, split[client])) for client in range(self.num_clients)]
        return [(client, event) for client in range(self.num_clients)]  # Ready, LoadFailed

    def _adapter_news(self, command: AddLora | RemoveLora, new_name: bool, reply: Reply) -> list[Event]:
        """What the other front ends learn from an adapter call's reply."""
        if isinstance(command, AddLora):
            if not new_name:
                return []
            if reply.error is not None:  # the name is free again
                if self.shared.get(command.name) == command.adapter_id:
                    del self.shared[command.name]
                return []
            assert reply.result is not None
            return [AdapterNamed(command.name, command.adapter_id, command.path, reply.result)]
        name = next((n for n, i in self.shared.items() if i == command.adapter_id), None)
        if reply.error is not None:
            if name is not None:
                self._unloaded.discard(command.adapter_id)
            return []
        if name is None:
            return []
        del self.shared[name]
        return [AdapterUnnamed(name, command.adapter_id)]

    def _split(self, outputs: list[RequestOutput]) -> list[tuple[int, list[RequestOutput]]]:
        """Outputs by front end (every front end listed, in order); a finished request's id is freed."""
        split: list[list[RequestOutput]] = [[] for _ in range(self.num_clients)]
        owners = self.owners
        for out in outputs:
            client = owners.pop(out.request_id, -1) if out.finished else owners.get(out.request_id, -1)
            if client >= 0:
                split[client].append(out)
        return list(enumerate(split))
