"""Response side of the Responses API: the `response` object, its output items (reasoning, an assistant
message, function calls) and the typed stream events that build them, each with its `sequence_number`."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .responses_protocol import ResponsesRequest


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(slots=True)
class ResponseHeader:
    """What every `response` object of one request repeats: its id, model and the request's settings."""

    id: str
    model: str
    request: ResponsesRequest
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                 finish_reason: str | None = None) -> dict[str, Any]:
        req = self.request
        incomplete = status == "incomplete"
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete and finish_reason == "length" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": req.reasoning.model_dump() if req.reasoning is not None else None,
            "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "truncation": "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
        }


def usage(input_tokens: int, output_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


def status_of(finish_reason: str | None) -> str:
    """A response that ran out of tokens is "incomplete" (reason max_output_tokens), as OpenAI's."""
    return "incomplete" if finish_reason == "length" else "completed"


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [text_part(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [reasoning_part(text)]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def output_items(content: str, calls: list[dict[str, Any]], status: str, reasoning: str = "") -> list[dict[str, Any]]:
    """A whole response's output: the reasoning (when there is some), the message (when there is
    text, or nothing else), then one item per call; the stream's items alike (EventWriter)."""
    items = [reasoning_item(new_item_id("rs"), reasoning, status)] if reasoning else []
    items += [message_item(new_item_id("msg"), content, status)] if content or not (calls or reasoning) else []
    for c in calls:
        items.append(call_item(new_item_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"], status))
    return items


class EventWriter:
    """Turns a stream of text and `delta.tool_calls` entries into the Responses API's events.

    Items open as their first text or call arrives; a call closes the message before it, and each
    call the one before it. `finish` closes what is open and ends with `response.completed` (or
    `response.incomplete`) carrying the whole output."""

    def __init__(self, header: ResponseHeader) -> None:
        self.header = header
        self.sequence_number = 0
        self.output: list[dict[str, Any]] = []  # closed items, and the open one last
        self.open: dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return json.dumps(body, ensure_ascii=False)

    def start(self) -> list[str]:
        response = self.header.response("in_progress", [])
        return [self.event("response.created", response=response),
                self.event("response.in_progress", response=response)]

    def reasoning(self, delta: str) -> list[str]:
        """More reasoning text: a reasoning item opens with the first."""
        if not delta:
            return []
        events = []
        if self.open is None or self.open["type"] != "reasoning":
            events += self.close()
            events += self._add(reasoning_item(new_item_id("rs"), None, "in_progress"))
            events.append(self.event("response.content_part.added", item_id=self.open_id, output_index=self.index,
                                     content_index=0, part=reasoning_part("")))
            self.open["content"] = [reasoning_part("")]  # type: ignore[index]
        self.open["content"][0]["text"] += delta  # type: ignore[index]
        events.append(self.event("response.reasoning_text.delta", item_id=self.open_id, output_index=self.index,
                                 content_index=0, delta=delta))
        return events

    def text(self, delta: str) -> list[str]:
        if not delta:
            return []
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self.close()
            events += self._add(message_item(new_item_id("msg"), None, "in_progress"))
            events.append(self.event("response.content_part.added", item_id=self.open_id, output_index=self.index,
                                     content_index=0, part=text_part("")))
            self.open["content"] = [text_part("")]  # type: ignore[index]
        self.open["content"][0]["text"] += delta  # type: ignore[index]
        events.append(self.event("response.output_text.delta", item_id=self.open_id, output_index=self.index,
                                 content_index=0, delta=delta, logprobs=[]))
        return events

    def tool_call(self, delta: dict[str, Any]) -> list[str]:
        """One `delta.tool_calls` entry: a new call (with its id and name), or more of its arguments."""
        events = []
        fn = delta.get("function", {})
        if "id" in delta:
            events += self.close()
            events += self._add(call_item(new_item_id("fc"), delta["id"], fn.get("name", ""), "", "in_progress"))
        fragment = fn.get("arguments", "")
        if fragment and self.open is not None and self.open["type"] == "function_call":
            self.open["arguments"] += fragment
            events.append(self.event("response.function_call_arguments.delta", item_id=self.open_id,
                                     output_index=self.index, delta=fragment))
        return events

    def close(self, status: str = "completed") -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        events = []
        if item["type"] == "reasoning":
            part = item["content"][0]
            events.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=self.index,
                                     content_index=0, text=part["text"]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=self.index,
                                     content_index=0, part=part))
        elif item["type"] == "message":
            part = item["content"][0]
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=self.index,
                                     content_index=0, text=part["text"], logprobs=[]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=self.index,
                                     content_index=0, part=part))
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=self.index, name=item["name"], arguments=item["arguments"]))
        events.append(self.event("response.output_item.done", output_index=self.index, item=item))
        return events

    def finish(self, finish_reason: str | None, input_tokens: int, output_tokens: int,
               reasoning_tokens: int = 0) -> list[str]:
        status = status_of(finish_reason)
        events = self.close("incomplete" if status == "incomplete" else "completed")
        response = self.header.response(status, self.output, usage(input_tokens, output_tokens, reasoning_tokens),
                                        finish_reason)
        return [*events, self.event(f"response.{status}", response=response)]

    def fail(self, code: str, message: str) -> str:
        response = self.header.response("failed", self.output)
        response["error"] = {"code": code, "message": message}
        return self.event("response.failed", response=response)

    @property
    def index(self) -> int:
        return len(self.output) - 1

    @property
    def open_id(self) -> str:
        assert self.open is not None
        return str(self.open["id"])

    def _add(self, item: dict[str, Any]) -> list[str]:
        self.open = item
        self.output.append(item)
        return [self.event("response.output_item.added", output_index=self.index, item=item)]
