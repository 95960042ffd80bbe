"""The engine wire codec (server/engine/wire.py): every command and event comes back equal to what
was sent, and what cannot cross fails with a message instead of a wrong value."""

from __future__ import annotations

import msgspec
import pytest

from sloth_serve.engine.outputs import EngineInfo, RequestOutput, StepStats
from sloth_serve.engine.sampling_params import SamplingParams, StructuredSpec
from sloth_serve.engine.sequence import FinishReason, TokenLogprob
from sloth_serve.engine.spec_decode.stats import SpecStats
from sloth_serve.engine.wire import (
    Abort,
    AddLora,
    AddRequest,
    Dead,
    LoadFailed,
    Ready,
    RemoveLora,
    Reply,
    Shutdown,
    StepOutputs,
    command_codec,
    event_codec,
    for_wire,
)
from sloth_serve.startup_clock import Phase


def _output(request_id: str = "chatcmpl-1-0", **changes: object) -> RequestOutput:
    fields: dict[str, object] = dict(
        new_token_ids=[11, 12], finished=False, num_prompt_tokens=7, num_output_tokens=2, num_cached_tokens=4,
        arrival_time=10.5, first_scheduled_time=10.75, first_token_time=11.0, adapter_id=2,
        new_logprobs=[TokenLogprob(11, -0.25, [(11, -0.25), (3, -1.5)]), TokenLogprob(12, -2.0, [])],
    )
    fields.update(changes)
    return RequestOutput(request_id, **fields)  # type: ignore[arg-type]


def _stats(**changes: object) -> StepStats:
    fields: dict[str, object] = dict(
        num_step_tokens=64, num_preempted=1, forward_seconds=0.004, num_prefix_queries=900, num_prefix_hits=300,
        running_adapters=frozenset({0, 2}), waiting_adapters=frozenset({3}), max_loras=4, kernel_compiles=1,
        slow_gc_pauses=2, gpu_memory_allocated=1 << 33, gpu_memory_reserved=1 << 34, num_state_slots_used=5,
    )
    fields.update(changes)
    return StepStats(123.25, 3, 2, 80, 100, **fields)  # type: ignore[arg-type]


COMMANDS = [
    AddRequest("cmpl-a-0", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0)),
    AddRequest("cmpl-b-1", list(range(300)), SamplingParams(
        max_tokens=64, top_p=0.9, top_k=40, min_p=0.05, seed=7, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, logit_bias={5: -100.0, 9: 2.5}, stop_token_ids=(2, 3),
        logprobs=3, prompt_logprobs=1, structured=StructuredSpec('{"type": "object"}')),
        3, frozenset({2, 7}), None, 12),
    AddRequest("cmpl-c-0", [4], SamplingParams(min_tokens=2, ignore_eos=True)),
    Abort("cmpl-a-0"),
    Abort("cmpl-a-0", FinishReason.ERROR),
    AddLora(4, 2, "sql", "/adapters/sql"),
    RemoveLora(5, 2),
    Shutdown(),
]

EVENTS = [
    StepOutputs([_output(), _output("chatcmpl-2-0", new_token_ids=[5], new_logprobs=[])], [_stats()]),
    StepOutputs([_output(finished=True, finish_reason=FinishReason.STOP, stop_token_id=2,
                         prompt_logprobs=[TokenLogprob(4, -3.0, [(4, -3.0)], rank=1)])],
                [_stats(), _stats(spec=SpecStats(True, 3, 9, 6, [3, 2, 1]), forward_seconds=None)]),
    StepOutputs([RequestOutput("r", [], True, FinishReason.ERROR, error="prompt is too long")]),  # a refusal
    StepOutputs([], [StepStats(1.0, 0, 0, 10, 10)]),
    Reply(1, 16),
    Reply(2, None, "adapter 'x' has rank 128 but --max-lora-rank is 64", True, (Phase("graphs", "graphs", 1.5),)),
    Dead("engine step failed: RuntimeError", [RequestOutput("r", [], True, FinishReason.ERROR, error="failed")]),
    Ready(EngineInfo("/models/base", None, frozenset({2, 3}), 32000, 4096, 900, 16, 64,
                     (Phase("load", "load", 2.0, 0.5),), True)),
    LoadFailed("OSError: no such folder"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_round_trips(command: object) -> None:
    codec = command_codec()
    assert codec.decode(codec.encode(command)) == command  # type: ignore[arg-type]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips(event: object) -> None:
    codec = event_codec()
    assert codec.decode(codec.encode(event)) == event  # type: ignore[arg-type]


def test_outputs_keep_their_types_after_the_crossing() -> None:
    codec = event_codec()
    event = codec.decode(codec.encode(EVENTS[1]))
    (out,), stats = event.outputs, event.stats[0]
    assert out.finish_reason is FinishReason.STOP
    assert isinstance(out.prompt_logprobs[0], TokenLogprob) and out.prompt_logprobs[0].rank == 1
    assert isinstance(stats.running_adapters, frozenset) and stats.kv_cache_usage == pytest.approx(0.2)


def test_outputs_cross_as_arrays_without_field_names() -> None:
    """array_like: a step of 64 outputs costs no field names on the wire (nor their encoding)."""
    frame = event_codec().encode(StepOutputs([_output(new_logprobs=[]) for _ in range(64)], [_stats()]))
    assert b"new_token_ids" not in frame and b"num_prompt_tokens" not in frame
    assert len(frame) < 64 * 60  # as maps with field names: ~300 bytes an output


def test_each_output_owns_its_logprobs_list() -> None:
    a, b = RequestOutput("a", [1], False), RequestOutput("b", [2], False)
    a.new_logprobs.append(TokenLogprob(1, -1.0, []))
    assert b.new_logprobs == []


def test_a_grammar_compiled_here_does_not_cross() -> None:
    compiled = object()  # this process's compiled grammar: not msgpack, and the engine compiles its own
    params = SamplingParams(structured=StructuredSpec('{"type": "string"}', compiled=compiled))
    sent = command_codec().decode(command_codec().encode(AddRequest("r", [1], for_wire(params))))
    assert sent.params.structured is not None and sent.params.structured.compiled is None
    assert sent.params.structured.json_schema == '{"type": "string"}'
    with pytest.raises(NotImplementedError, match="cannot send object"):
        command_codec().encode(AddRequest("r", [1], params))


def test_garbage_and_wrong_direction_frames_are_rejected() -> None:
    with pytest.raises(msgspec.DecodeError):
        event_codec().decode(b"\xc1 not msgpack")
    with pytest.raises(msgspec.ValidationError):  # a command read as an event: no such tag
        event_codec().decode(command_codec().encode(Abort("r")))
    with pytest.raises(msgspec.ValidationError):  # an output whose token ids are not ints
        event_codec().decode(msgspec.msgpack.encode(["StepOutputs", [["r", ["x"], False]], []]))


def test_an_unknown_extension_type_is_rejected() -> None:
    """Only tensors (an image's pixels, typed Any) cross as msgpack extensions."""
    image = {"content_hash": "h", "offset": 0, "num_tokens": 4, "grid_thw": [1, 2, 2],
             "pixel_values": msgspec.msgpack.Ext(9, b"??")}
    frame = msgspec.msgpack.encode(["AddRequest", "r", [1, 1, 1, 1], {}, 0, None, {"images": [image]}, 0])
    with pytest.raises(NotImplementedError, match="unknown msgpack extension 9"):
        command_codec().decode(frame)
