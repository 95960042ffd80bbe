"""The Responses API's stream events from text and tool-call deltas (no model): items open and close
in order, a call closes the message before it, sequence numbers count up, and the final response
holds the whole output; a length cut ends with response.incomplete."""

from __future__ import annotations

import json

from sloth_serve.api.responses_output import EventWriter, ResponseHeader
from sloth_serve.api.responses_protocol import ResponsesRequest


def writer() -> EventWriter:
    return EventWriter(ResponseHeader("resp_1", "base", ResponsesRequest.model_validate({"input": "hi"})))


def test_text_then_call_gives_two_items_in_order() -> None:
    w = writer()
    events = [json.loads(e) for e in [
        *w.start(), *w.text("Let me "), *w.text("check."),
        *w.tool_call({"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x"'}}),
        *w.tool_call({"index": 0, "function": {"arguments": ": 1}"}}),
        *w.finish("tool_calls", 5, 7),
    ]]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    message, call = final["output"]
    assert message["content"][0]["text"] == "Let me check." and message["status"] == "completed"
    assert call["call_id"] == "call_a" and call["arguments"] == '{"x": 1}' and call["name"] == "f"
    assert events[10]["output_index"] == 1 and events[4]["output_index"] == 0
    assert final["usage"]["total_tokens"] == 12 and final["status"] == "completed"


def test_a_length_cut_ends_incomplete_with_the_reason() -> None:
    w = writer()
    events = [json.loads(e) for e in [*w.start(), *w.text("abc"), *w.finish("length", 3, 4)]]
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][0]["status"] == "incomplete"
