"""Streamed chunks serialized from a per-response template.

A stream sends one chunk per token and choice; building a pydantic model and serializing it each
time was a tenth of the API thread's time at 64 streams. Everything but the choice is fixed for a
response, so the envelope is serialized once (by the pydantic model itself, so the bytes are the
same) and each chunk only encodes its text. Choices with logprobs, and the usage chunk, still go
through the models: they are rare and their shape is larger.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    Usage,
)

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # pydantic's escaping


def _envelope(model: ChatCompletionChunk | CompletionResponse) -> tuple[str, str]:
    """The chunk's JSON split around its choices list (which the model was given empty)."""
    text = model.model_dump_json()
    head, sep, tail = text.partition('"choices":[]')
    if not sep:
        raise AssertionError("the chunk envelope has no empty choices list")
    return head + '"choices":[', "]" + tail


def _finish(reason: str | None) -> str:
    return "null" if reason is None else _encode(reason)


class CompletionChunks:
    """`text_completion` chunks of one streamed response."""

    def __init__(self, response_id: str, created: int, model: str) -> None:
        self.response_id, self.created, self.model = response_id, created, model
        self.head, self.tail = _envelope(CompletionResponse(id=response_id, created=created, model=model, choices=[]))

    def choice(self, choice: CompletionChoice) -> str:
        if choice.logprobs is not None:
            body = choice.model_dump_json()
        else:
            body = (f'{{"index":{choice.index},"text":{_encode(choice.text)},"logprobs":null,'
                    f'"finish_reason":{_finish(choice.finish_reason)}}}')
        return self.head + body + self.tail

    def usage(self, usage: Usage) -> str:
        return CompletionResponse(id=self.response_id, created=self.created, model=self.model, choices=[],
                                  usage=usage).model_dump_json()


class ChatChunks:
    """`chat.completion.chunk` chunks of one streamed response."""

    def __init__(self, response_id: str, created: int, model: str) -> None:
        self.response_id, self.created, self.model = response_id, created, model
        self.head, self.tail = _envelope(ChatCompletionChunk(id=response_id, created=created, model=model, choices=[]))

    def choice(self, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: Any = None) -> str:
        if logprobs is not None:
            body = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason).model_dump_json()
        else:
            body = (f'{{"index":{index},"delta":{_encode(delta)},"logprobs":null,'
                    f'"finish_reason":{_finish(finish_reason)}}}')
        return self.head + body + self.tail

    def usage(self, usage: Usage) -> str:
        return ChatCompletionChunk(id=self.response_id, created=self.created, model=self.model, choices=[],
                                   usage=usage).model_dump_json()
