"""Request bodies of the OpenAI API (pydantic), and the check that rejects fields OpenAI defines but
this server does not implement: a 400 naming the field, never a silent ignore. Unknown extra
fields are ignored, as OpenAI does."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.api.errors import APIError, invalid_param


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    skip_special_tokens: bool = True

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_common(self) -> None:
        if any(s == "" for s in self.stop_strings):
            raise invalid_param("stop", "stop strings must not be empty")
        if self.stream_options is not None and not self.stream:
            raise invalid_param("stream_options", "stream_options is only allowed when stream is true")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None


# OpenAI fields whose effect this server cannot honour. Each maps to the values that mean
# "the feature is off" and are therefore accepted.
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "verbosity": (),
    "store": (False,),
}

COMPLETION_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": ("",),
}

CHAT_ROLES = ("system", "developer", "user", "assistant")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Declared only so that check() can name them; see CHAT_UNSUPPORTED.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    store: Any = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def check(self) -> None:
        self.check_common()
        reject_unsupported(self, CHAT_UNSUPPORTED)
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_param("top_logprobs", "top_logprobs requires logprobs to be true")

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template wants them: role and plain-text content."""
        return [message_for_template(i, m) for i, m in enumerate(self.messages)]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1)
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        def is_ids(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        ok = isinstance(value, str) or (
            isinstance(value, list)
            and (is_ids(value) or all(isinstance(v, str) for v in value) or all(is_ids(v) for v in value))
        )
        if not ok:
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
            )
        return value

    def check(self) -> None:
        self.check_common()
        reject_unsupported(self, COMPLETION_UNSUPPORTED)
        if self.best_of is not None and self.best_of != self.n:
            raise invalid_param(
                "best_of", f"best_of={self.best_of} (different from n={self.n}) is not supported; drop it"
            )
        if self.echo and self.logprobs is not None:
            raise invalid_param("echo", "echo with logprobs is not supported: prompt logprobs are not computed")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise invalid_param("prompt", "prompt must not be empty")
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True

    def conversation(self) -> list[dict[str, str]]:
        return [message_for_template(i, m) for i, m in enumerate(self.messages or [])]


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def reject_unsupported(req: BaseModel, table: dict[str, tuple[Any, ...]]) -> None:
    for name, allowed in table.items():
        value = getattr(req, name)
        if value is None or name not in req.model_fields_set:
            continue
        if any(value == ok for ok in allowed):
            continue
        raise APIError(f"'{name}' is not supported by this server; remove it from the request", 400, param=name)


def message_for_template(i: int, m: ChatMessage) -> dict[str, str]:
    if m.role not in CHAT_ROLES:
        raise invalid_param(
            f"messages[{i}].role", f"role {m.role!r} is not supported; use one of {', '.join(CHAT_ROLES)}"
        )
    for field in ("tool_calls", "tool_call_id", "function_call"):
        if getattr(m, field) is not None:
            raise invalid_param(f"messages[{i}].{field}", f"'{field}' in messages is not supported (no tool use)")
    # OpenAI's "developer" role is the system role of newer models; templates know "system".
    role = "system" if m.role == "developer" else m.role
    out = {"role": role, "content": message_text(i, m.content)}
    if m.name is not None:
        out["name"] = m.name
    return out


def message_text(i: int, content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text":
            raise invalid_param(
                f"messages[{i}].content[{j}].type",
                f"content part type {kind!r} is not supported; only 'text' parts are",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid_param(f"messages[{i}].content[{j}].text", "a text part needs a string 'text'")
        texts.append(text)
    return "\n".join(texts)
