"""One engine, several front ends (--api-server-count): each request's outputs and each adapter call's
reply go back to the front end that sent it, aborts reach only their own requests, and the engine
stops once every front end has stopped; a shared adapter loaded or unloaded through one front end is
announced to the others, and its name is refused to another folder (server/engine/client_router.py)."""

from __future__ import annotations

from sloth_serve.engine.client_router import ClientRouter
from sloth_serve.engine.outputs import RequestOutput, StepStats
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.engine.sequence import FinishReason
from sloth_serve.engine.wire import (
    Abort,
    AdapterNamed,
    AdapterUnnamed,
    AddLora,
    AddRequest,
    Dead,
    LoadFailed,
    RemoveLora,
    Reply,
    Shutdown,
    StepOutputs,
    command_codec,
    event_codec,
)


def _add(router: ClientRouter, client: int, request_id: str) -> None:
    command, answers = router.command(client, AddRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=4)))
    assert command is not None and answers == []


def _out(request_id: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id, [7], finished, FinishReason.LENGTH if finished else None)


def _stats() -> StepStats:
    return StepStats(time=1.0, num_running=2, num_waiting=0, num_free_blocks=10, num_blocks=12)


def test_outputs_go_to_the_front_end_that_added_the_request() -> None:
    router = ClientRouter(3)
    _add(router, 0, "a")
    _add(router, 2, "b")
    stats = _stats()
    routed = router.event(StepOutputs([_out("a"), _out("b"), _out("gone")], [stats]))
    by_client = {client: event for client, event in routed}
    assert isinstance(by_client[0], StepOutputs) and [o.request_id for o in by_client[0].outputs] == ["a"]
    assert isinstance(by_client[2], StepOutputs) and [o.request_id for o in by_client[2].outputs] == ["b"]
    # The front end without requests still gets the step's record (its /health and gauges).
    assert isinstance(by_client[1], StepOutputs) and by_client[1].outputs == [] and by_client[1].stats == [stats]
    # A request's last output frees its id: later outputs under it go nowhere.
    router.event(StepOutputs([_out("a", finished=True)]))
    assert router.event(StepOutputs([_out("a")])) == []
    assert "a" not in router.owners and router.owners["b"] == 2


def test_outputs_without_a_step_record_skip_front_ends_they_do_not_concern() -> None:
    router = ClientRouter(2)
    _add(router, 1, "x")
    routed = router.event(StepOutputs([_out("x", finished=True)]))
    assert [client for client, _ in routed] == [1]


def test_an_id_in_use_by_another_front_end_is_refused_to_its_sender_alone() -> None:
    router = ClientRouter(2)
    _add(router, 0, "same")
    command, answers = router.command(1, AddRequest("same", [1], SamplingParams()))
    assert command is None
    [(client, event)] = answers
    assert client == 1 and isinstance(event, StepOutputs)
    [out] = event.outputs
    assert out.finished and out.finish_reason is FinishReason.ERROR and "another API server" in (out.error or "")
    assert router.owners["same"] == 0  # the first front end's request runs on


def test_a_front_end_aborts_only_its_own_requests() -> None:
    router = ClientRouter(2)
    _add(router, 0, "mine")
    assert router.command(1, Abort("mine"))[0] is None
    assert router.command(0, Abort("mine"))[0] == Abort("mine")
    assert router.command(0, Abort("unknown"))[0] is None


def test_adapter_calls_are_renumbered_and_replied_to_their_caller() -> None:
    router = ClientRouter(2)
    # Both front ends number their calls from 0: the engine sees distinct ids.
    first, _ = router.command(0, AddLora(0, 1, "sql", "/adapters/sql"))
    second, _ = router.command(1, AddLora(0, 1, "sql", "/adapters/sql"))
    removal, _ = router.command(1, RemoveLora(1, 1))
    assert isinstance(first, AddLora) and isinstance(second, AddLora) and isinstance(removal, RemoveLora)
    assert len({first.call_id, second.call_id, removal.call_id}) == 3
    assert (second.adapter_id, second.name, second.path) == (1, "sql", "/adapters/sql")
    assert router.event(Reply(second.call_id, result=16)) == [(1, Reply(0, result=16))]
    assert router.event(Reply(first.call_id, error="bad", is_value_error=True)) == \
        [(0, Reply(0, error="bad", is_value_error=True))]
    assert router.event(Reply(removal.call_id)) == [(1, Reply(1))]
    assert router.event(Reply(first.call_id, result=16)) == []  # answered already


def _replied(router: ClientRouter, client: int, command: AddLora | RemoveLora, result: int | None = None,
             error: str | None = None) -> list[tuple[int, object]]:
    """Send the call through the router, then the engine's reply to it back."""
    sent, answers = router.command(client, command)
    assert sent is not None and answers == []
    return list(router.event(Reply(sent.call_id, result=result, error=error)))


def test_a_shared_adapter_loaded_through_one_front_end_is_announced_to_the_others() -> None:
    router = ClientRouter(3)
    routed = _replied(router, 1, AddLora(4, 2**21 + 1, "sql", "/adapters/sql", shared=True), result=16)
    assert routed == [(1, Reply(4, result=16)), (0, AdapterNamed("sql", 2**21 + 1, "/adapters/sql", 16)),
                      (2, AdapterNamed("sql", 2**21 + 1, "/adapters/sql", 16))]
    # Unloaded through another front end: the rest are told, the caller gets its reply.
    routed = _replied(router, 2, RemoveLora(0, 2**21 + 1))
    assert routed == [(2, Reply(0)), (0, AdapterUnnamed("sql", 2**21 + 1)), (1, AdapterUnnamed("sql", 2**21 + 1))]
    assert router.shared == {}
    # A --lora-dir adapter loaded on a request is its front end's own: nobody else hears of it.
    assert _replied(router, 0, AddLora(1, 2**20 + 1, "sql", "/adapters/sql"), result=16) == [(0, Reply(1, result=16))]
    assert _replied(router, 0, RemoveLora(2, 2**20 + 1)) == [(0, Reply(2))]


def test_a_shared_name_held_by_another_adapter_is_refused_until_it_is_free() -> None:
    router = ClientRouter(2)
    loading, _ = router.command(0, AddLora(0, 2**20 + 1, "sql", "/adapters/sql", shared=True))
    assert loading is not None
    # Another front end's folder under the name while the first still loads: refused at once.
    refused, answers = router.command(1, AddLora(0, 2**21 + 1, "sql", "/adapters/other", shared=True))
    assert refused is None
    [(client, reply)] = answers
    assert client == 1 and isinstance(reply, Reply) and reply.is_value_error and "already loaded" in (reply.error or "")
    # The first load fails: nobody is told, and the name is free again.
    assert router.event(Reply(loading.call_id, error="no such folder", is_value_error=True)) == \
        [(0, Reply(0, error="no such folder", is_value_error=True))]
    assert _replied(router, 1, AddLora(1, 2**21 + 1, "sql", "/adapters/other", shared=True), result=8)[1:] == \
        [(0, AdapterNamed("sql", 2**21 + 1, "/adapters/other", 8))]


def test_the_lora_adapters_every_front_end_loads_at_start_up_are_one_adapter() -> None:
    """Each front end loads each --lora adapter under the same id: the first load is announced (a front
    end still starting finds it named already), the others pass without a word."""
    router = ClientRouter(2)
    first, _ = router.command(0, AddLora(0, 1, "upper", "/adapters/upper", shared=True))
    second, answers = router.command(1, AddLora(0, 1, "upper", "/adapters/upper", shared=True))
    assert first is not None and second is not None and answers == []
    assert router.event(Reply(second.call_id, result=16)) == [(1, Reply(0, result=16))]
    assert router.event(Reply(first.call_id, result=16)) == [(0, Reply(0, result=16)),
                                                           (1, AdapterNamed("upper", 1, "/adapters/upper", 16))]
    # Unloaded through one front end: gone for both.
    assert _replied(router, 1, RemoveLora(1, 1)) == [(1, Reply(1)), (0, AdapterUnnamed("upper", 1))]


def test_a_lora_adapter_unloaded_before_a_starting_front_end_loads_it_is_not_loaded_again() -> None:
    """Front end 0 is serving, front end 1 still starting: an unload of a --lora adapter through 0 before
    1 asks for it withdraws it for 1 too (its load is answered at once, the engine never sees it);
    another load of the name (a runtime load takes an id of its own) is served as before."""
    router = ClientRouter(2)
    assert _replied(router, 0, AddLora(0, 1, "upper", "/adapters/upper", shared=True), result=16)[1:] == \
        [(1, AdapterNamed("upper", 1, "/adapters/upper", 16))]
    assert _replied(router, 0, RemoveLora(1, 1)) == [(0, Reply(1)), (1, AdapterUnnamed("upper", 1))]
    late, answers = router.command(1, AddLora(0, 1, "upper", "/adapters/upper", shared=True))
    assert late is None and router.shared == {}
    [(client, reply)] = answers
    assert client == 1 and isinstance(reply, Reply) and reply.withdrawn and reply.is_value_error
    assert "unloaded through another API server" in (reply.error or "")
    assert _replied(router, 0, AddLora(2, 2**20 + 1, "upper", "/adapters/upper", shared=True), result=16)[1:] == \
        [(1, AdapterNamed("upper", 2**20 + 1, "/adapters/upper", 16))]


def test_a_lora_adapter_being_unloaded_is_withdrawn_already() -> None:
    """The starting front end's load reaches the router after the unload but before its reply: it is
    withdrawn as well (the engine would run the removal, then load it again). A removal that fails
    gives the id back."""
    router = ClientRouter(2)
    _replied(router, 0, AddLora(0, 1, "upper", "/adapters/upper", shared=True), result=16)
    removing, _ = router.command(0, RemoveLora(1, 1))
    assert removing is not None
    late, answers = router.command(1, AddLora(0, 1, "upper", "/adapters/upper", shared=True))
    assert late is None and isinstance(answers[0][1], Reply) and answers[0][1].withdrawn
    assert router.event(Reply(removing.call_id, error="engine busy")) == [(0, Reply(1, error="engine busy"))]
    assert router.shared == {"upper": 1}
    again, answers = router.command(1, AddLora(1, 1, "upper", "/adapters/upper", shared=True))
    assert again is not None and answers == []


def test_death_reaches_every_front_end_with_its_own_requests() -> None:
    router = ClientRouter(2)
    _add(router, 0, "a")
    _add(router, 1, "b")
    error = RequestOutput("b", [], True, FinishReason.ERROR, error="boom")
    routed = dict(router.event(Dead("boom", [error])))
    assert routed[0] == Dead("boom", []) and routed[1] == Dead("boom", [error])
    # Start-up's events go to every front end.
    assert [client for client, _ in router.event(LoadFailed("no such folder"))] == [0, 1]


def test_the_engine_stops_once_every_front_end_has_and_stopped_ones_get_nothing() -> None:
    router = ClientRouter(2)
    _add(router, 1, "b")
    assert router.command(0, Shutdown()) == (None, [])
    # Front end 0 is gone: a send to it would wait for it.
    assert [client for client, _ in router.event(StepOutputs([_out("b")], [_stats()]))] == [1]
    assert router.command(1, Shutdown()) == (Shutdown(), [])


def test_routed_events_survive_the_wire() -> None:
    router = ClientRouter(2)
    _add(router, 1, "b")
    [(_, event)] = [r for r in router.event(StepOutputs([_out("b")], [_stats()])) if r[0] == 1]
    decoded = event_codec().decode(event_codec().encode(event))
    assert decoded == event
    command = AddRequest("c", [5], SamplingParams())
    assert command_codec().decode(command_codec().encode(command)) == command
