"""Response bodies of the OpenAI API (pydantic): completions, their streamed chunks, usage,
logprobs in both the chat and the legacy completions format, and the model list."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import Response
from pydantic import BaseModel, Field


def now() -> int:
    return int(time.time())


def json_response(body: BaseModel) -> Response:
    """Serialize with pydantic's own (fast) serializer instead of FastAPI's jsonable_encoder."""
    return Response(body.model_dump_json(), media_type="application/json")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # For models with a reasoning format only: how many of the completion tokens were reasoning.
    completion_tokens_details: CompletionTokensDetails | None = Field(default=None, exclude_if=lambda v: v is None)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> Usage:
        details = None if reasoning_tokens is None else CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            completion_tokens_details=details,
        )


# --- logprobs ------------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One token of a prompt position in vLLM's `prompt_logprobs` (keyed by token id)."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


# vLLM's shape: None for the first prompt token, then {token id: PromptLogprob} per position.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


# --- chat ----------------------------------------------------------------------------------------


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = ""  # None when the message is tool calls only
    # The model's reasoning, for models with a reasoning format: vLLM's field, and `reasoning`, the name
    # newer vLLM gives it (both, so that clients of either read it); left out of the body otherwise.
    reasoning_content: str | None = Field(default=None, exclude_if=lambda v: v is None)
    reasoning: str | None = Field(default=None, exclude_if=lambda v: v is None)
    # Left out of the body when there are none.
    tool_calls: list[ResponseToolCall] | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    # With the request's `prompt_logprobs` only (vLLM's extra field).
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    # {"role": "assistant"} first, then {"content": ...} or {"tool_calls": [...]}; {} at the end
    delta: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    # On one chunk per choice, with the request's `prompt_logprobs` only (vLLM's extra field).
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda v: v is None)


# --- completions ---------------------------------------------------------------------------------


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # With the request's `prompt_logprobs` only (vLLM's extra field).
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda v: v is None)


class CompletionResponse(BaseModel):
    """Both the whole response and each streamed chunk: OpenAI uses one shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --- models --------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "sloth-serve"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    # Beyond OpenAI's fields (clients ignore them): where this model's chat template comes from
    # ("base", "adapter", "flag" for --chat-template, "none"), its sha256 (12 hex digits), and whose
    # tokenizer encodes its requests ("base" or "adapter").
    chat_template: str | None = None
    chat_template_hash: str | None = None
    tokenizer: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
