"""One engine process, several front ends (--api-server-count): which front end each request and
adapter call came from, so that every output and reply goes back to its sender alone. Pure
bookkeeping over the wire messages (no sockets), used by the engine process's command and event
threads under one lock."""

from __future__ import annotations

import itertools

from .outputs import RequestOutput
from .sequence import FinishReason
from .wire import Abort, AddLora, AddRequest, Command, Dead, Event, RemoveLora, Reply, Shutdown, StepOutputs

Routed = list[tuple[int, Event]]  # (front end index, event for it)


class ClientRouter:
    """Front ends are numbered 0..num_clients-1. A request id belongs to the front end that added it
    until its last output; call ids are each front end's own count, so they are renumbered on the way
    in and given back on the way out. Step records (StepStats) go to every front end: each answers
    /health and the gauges itself."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.owners: dict[str, int] = {}  # request id -> front end, while the request runs
        self._calls: dict[int, tuple[int, int]] = {}  # engine call id -> (front end, its call id)
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
            call_id = next(self._call_ids)
            self._calls[call_id] = (client, command.call_id)
            if isinstance(command, AddLora):
                return AddLora(call_id, command.adapter_id, command.name, command.path), []
            return RemoveLora(call_id, command.adapter_id), []
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
            client, call_id = self._calls.pop(event.call_id, (-1, -1))
            if client < 0:
                return []
            return [(client, Reply(call_id, event.result, event.error, event.is_value_error, event.startup_phases))]
        if isinstance(event, Dead):  # every front end learns why; each gets its own requests' ends
            split = dict(self._split(event.outputs))
            return [(client, Dead(event.reason, split[client])) for client in range(self.num_clients)]
        return [(client, event) for client in range(self.num_clients)]  # Ready, LoadFailed

    def _split(self, outputs: list[RequestOutput]) -> list[tuple[int, list[RequestOutput]]]:
        """Outputs by front end (every front end listed, in order); a finished request's id is freed."""
        split: list[list[RequestOutput]] = [[] for _ in range(self.num_clients)]
        owners = self.owners
        for out in outputs:
            client = owners.pop(out.request_id, -1) if out.finished else owners.get(out.request_id, -1)
            if client >= 0:
                split[client].append(out)
        return list(enumerate(split))
