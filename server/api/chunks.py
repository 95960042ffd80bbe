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

from .responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    PromptLogprobs,
    Usage,
)

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # pydantic's escaping


def _finish(reason: str | None) -> str:
    return "null" if reason is None else _encode(reason)


class _Chunks:
    """The chunks of one streamed response: the envelope (everything but the choices) serialized
    once by the response model itself, split around its empty choices list."""

    Model: type[ChatCompletionChunk] | type[CompletionResponse]

    def __init__(self, response_id: str, created: int, model: str) -> None:
        self.response_id, self.created, self.model = response_id, created, model
        text = self._envelope().model_dump_json()
        head, sep, tail = text.partition('"choices":[]')
        if not sep:
            raise AssertionError("the chunk envelope has no empty choices list")
        self.head, self.tail = head + '"choices":[', "]" + tail

    def _envelope(self, usage: Usage | None = None) -> ChatCompletionChunk | CompletionResponse:
        return self.Model(id=self.response_id, created=self.created, model=self.model, choices=[], usage=usage)

    def _wrap(self, choice_json: str) -> str:
        return self.head + choice_json + self.tail

    def usage(self, usage: Usage) -> str:
        return self._envelope(usage).model_dump_json()


class CompletionChunks(_Chunks):
    """`text_completion` chunks of one streamed response."""

    Model = CompletionResponse

    def choice(self, choice: CompletionChoice) -> str:
        if choice.logprobs is not None or choice.prompt_logprobs is not None:
            return self._wrap(choice.model_dump_json())
        return self._wrap(f'{{"index":{choice.index},"text":{_encode(choice.text)},"logprobs":null,'
                          f'"finish_reason":{_finish(choice.finish_reason)}}}')


class ChatChunks(_Chunks):
    """`chat.completion.chunk` chunks of one streamed response."""

    Model = ChatCompletionChunk

    def choice(self, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: Any = None) -> str:
        if logprobs is not None:
            return self._wrap(ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                              finish_reason=finish_reason).model_dump_json())
        return self._wrap(f'{{"index":{index},"delta":{_encode(delta)},"logprobs":null,'
                          f'"finish_reason":{_finish(finish_reason)}}}')

    def prompt(self, index: int, prompt_logprobs: PromptLogprobs) -> str:
        """A chunk with an empty delta and the choice's prompt logprobs (vLLM's extra field)."""
        return ChatCompletionChunk(id=self.response_id, created=self.created, model=self.model,
                                   choices=[ChatChunkChoice(index=index, delta={})],
                                   prompt_logprobs=prompt_logprobs).model_dump_json()
