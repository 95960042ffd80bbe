"""Request body of OpenAI's Responses API (`POST /v1/responses`) and its translation into a chat
completion request, so that it runs through the chat endpoint's template, tool and grammar machinery.
Nothing is stored: `previous_response_id` and the other server-side state fields are refused."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError, invalid_param
from .protocol import ChatCompletionRequest, RequestBody, reject_unsupported

# Fields of the Responses API this server cannot honour, with the values that mean "off" (accepted).
RESPONSES_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "background": (False,),
    "conversation": (),
    "prompt": (),
    "include": ([],),
    "max_tool_calls": (),
    "top_logprobs": (0,),
    "truncation": ("disabled",),
}
# Message item roles and the content part types read as text.
_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # accepted; the output always follows the schema


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only level a template-driven model has


class ResponsesTool(BaseModel):
    """A tool in the Responses API's flat form: `{type, name, description, parameters, strict}`."""

    model_config = ConfigDict(extra="ignore")

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: str | None = None
    summary: str | None = None  # accepted; the reasoning comes back whole, never summarized


class ResponsesRequest(RequestBody):

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    text: TextConfig | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool | None = None  # accepted either way: nothing is ever stored (the response says store: false)
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    stream_options: dict[str, Any] | None = None
    # Extras (vLLM-style extra_body), passed to the sampler as on the chat endpoint.
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    timeout: float | None = None
    # {"effort": ...}: passed to the chat template as reasoning_effort (as on the chat endpoint); the
    # reasoning itself comes back as a reasoning item for models with a reasoning format.
    reasoning: ReasoningConfig | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # an extra, as on the chat endpoint
    structured_outputs: dict[str, Any] | None = None  # an extra, as on the chat endpoint (regex / grammar)
    # Declared only so that check() can name them; see RESPONSES_UNSUPPORTED.
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    include: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    truncation: Any = None

    def check(self) -> None:
        if self.previous_response_id is not None:
            raise invalid_param(
                "previous_response_id",
                "previous_response_id is not supported: this server does not store responses (store is always "
                "false). Send the whole conversation in `input` instead, including earlier output items",
            )
        reject_unsupported(self, RESPONSES_UNSUPPORTED)
        for i, tool in enumerate(self.tools or ()):
            if tool.type != "function":
                raise invalid_param(f"tools[{i}].type", f"tool type {tool.type!r} is not supported; "
                                    "only 'function' tools are")
            if not tool.name:
                raise invalid_param(f"tools[{i}].name", "a function tool needs a 'name'")

    @property
    def format_type(self) -> str:
        fmt = self.text.format if self.text is not None else None
        return "text" if fmt is None else fmt.type

    def to_chat(self) -> ChatCompletionRequest:
        """The equivalent chat completion request (not yet checked: admit_generation checks it)."""
        self.check()
        body: dict[str, Any] = {"messages": self.messages(), "stream": self.stream}
        sampling = ("model", "temperature", "top_p", "parallel_tool_calls", "seed", "top_k", "min_p", "user",
                    "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "timeout",
                    "chat_template_kwargs", "structured_outputs")
        body.update({k: getattr(self, k) for k in sampling if getattr(self, k) is not None})
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_effort"] = self.reasoning.effort
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = _tool_choice(self.tool_choice)
        fmt = self.text.format if self.text is not None else None
        if fmt is not None:
            body["response_format"] = _response_format(fmt)
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise as_responses_error(invalid_param(where, f"{where}: {first.get('msg', 'invalid value')}")) from None

    def messages(self) -> list[dict[str, Any]]:
        """`instructions` and `input` as chat messages: function_call items become the assistant's
        tool_calls, function_call_output items tool messages, and a reasoning item's text the next
        assistant turn's reasoning_content (templates that render past reasoning read it)."""
        out: list[dict[str, Any]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        if not self.input:
            raise invalid_param("input", "input must not be empty")
        thought: str | None = None  # a reasoning item's text, for the assistant turn it precedes
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind == "message":
                out.append(_message(i, item))
            elif kind == "function_call":
                call = {"id": _string(item, "call_id", i), "type": "function",
                        "function": {"name": _string(item, "name", i), "arguments": _string(item, "arguments", i)}}
                if out and out[-1]["role"] == "assistant" and thought is None:
                    out[-1].setdefault("tool_calls", []).append(call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                text = output if isinstance(output, str) else _parts_text(f"input[{i}].output", output)
                out.append({"role": "tool", "tool_call_id": _string(item, "call_id", i), "content": text})
            elif kind == "reasoning":
                parts = item.get("content") or item.get("summary") or []
                thought = "\n".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
                continue
            else:
                raise invalid_param(f"input[{i}].type", f"input item type {kind!r} is not supported; use 'message', "
                                    "'function_call', 'function_call_output' or 'reasoning'")
            if thought is not None and out[-1]["role"] == "assistant":
                out[-1]["reasoning_content"], thought = thought, None
        return out


def _message(i: int, item: dict[str, Any]) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise invalid_param(f"input[{i}].role", f"role {role!r} is not supported; use one of {', '.join(_ROLES)}")
    content = item.get("content")
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "input_image" for p in content):
        return {"role": role, "content": _parts_with_images(f"input[{i}].content", content)}
    text = content if isinstance(content, str) else _parts_text(f"input[{i}].content", content)
    return {"role": role, "content": text}


def _parts_with_images(where: str, parts: list[Any]) -> list[dict[str, Any]]:
    """Text and input_image parts as chat content parts (the chat endpoint's image_url parts, whose
    images server/api/images.py checks; only image-text models take them)."""
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        if isinstance(part, dict) and part.get("type") == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise invalid_param(f"{where}[{j}].image_url", "an input_image part needs an image_url (a base64 data "
                                    "URL, data:image/png;base64,...); file_id is not supported")
            out.append({"type": "image_url", "image_url": {"url": url}})
        else:
            out.append({"type": "text", "text": _part_text(where, j, part)})
    return out


def _parts_text(where: str, parts: Any) -> str:
    if not isinstance(parts, list):
        raise invalid_param(where, f"{where} must be a string or a list of input_text parts")
    return "\n".join(_part_text(where, j, part) for j, part in enumerate(parts))


def _part_text(where: str, j: int, part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in _TEXT_PARTS:
        raise invalid_param(f"{where}[{j}].type", f"content part type {kind!r} is not supported; only text "
                            "parts (input_text, output_text) and input_image are")
    if not isinstance(part.get("text"), str):
        raise invalid_param(f"{where}[{j}].text", "a text part needs a string 'text'")
    return str(part["text"])


def _string(item: dict[str, Any], key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid_param(f"input[{i}].{key}", f"a {item.get('type')} item needs a string '{key}'")
    return value


def _tool_choice(choice: str | dict[str, Any]) -> Any:
    if isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise invalid_param("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                            "{\"type\": \"function\", \"name\": <function name>}")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(fmt: TextFormat) -> dict[str, Any]:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    if fmt.name is None or fmt.schema_ is None:
        raise invalid_param("text.format", "text.format of type 'json_schema' needs a 'name' and a 'schema'")
    spec = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


# The chat request's field paths, as the Responses API names them.
_RENAMES = (
    (re.compile(r"response_format\.json_schema\.schema"), "text.format.schema"),
    (re.compile(r"response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"tools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"max_completion_tokens"), "max_output_tokens"),
    (re.compile(r"reasoning_effort"), "reasoning.effort"),
    (re.compile(r"\bmessages(\[\d+\])?"), "input"),
)


def _rename(text: str) -> str:
    for pattern, name in _RENAMES:
        text = pattern.sub(name, text)
    return text


def as_responses_error(exc: APIError) -> APIError:
    """The chat machinery's error with its field paths in the Responses API's names."""
    exc.message = _rename(exc.message)
    exc.param = _rename(exc.param) if exc.param else exc.param
    return exc
