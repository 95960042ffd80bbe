"""Request bodies of the OpenAI API (pydantic), and the check that rejects fields OpenAI defines but
this server does not implement: a 400 naming the field, never a silent ignore. Unknown extra
fields are ignored, as OpenAI does."""

from __future__ import annotations

import json
import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import APIError, invalid_param

# Caps on stop conditions: each stop string is searched for in the text of every delta, and the
# longest decides how much text is held back. OpenAI allows 4 stop strings; vLLM has no cap.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
# A seed is a signed 64-bit integer that is not negative, as in vLLM and OpenAI's SDK types; choice j
# of a request with n > 1 samples with (seed + j) mod 2**63.
SEED_LIMIT = 2**63
# JSON schemas (response_format, tool parameters) are compiled into a grammar: bounded before any
# work is done on them. Depth counts every object and array level of the schema document (a nested
# object property takes two: its schema and its "properties"); OpenAI's strict mode allows 10 levels
# of nested objects and 5000 properties, well inside these.
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_CHARS = 128 * 1024  # of the schema as compact JSON; all tools' parameters together too


class RequestBody(BaseModel):
    """A request body or part of one: an explicit `null` for a field that cannot be None means its
    default. OpenAI marks such fields nullable, and its SDKs send `null` for a caller's None."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            defaulted = _defaulted_fields(cls)
            if any(data.get(name, 0) is None for name in defaulted):
                data = {k: v for k, v in data.items() if v is not None or k not in defaulted}
        return data


_DEFAULTED: dict[type, frozenset[str]] = {}


def _defaulted_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields of `model` (and their aliases) with a default that cannot be None."""
    names = _DEFAULTED.get(model)
    if names is None:
        names = frozenset(n for name, f in model.model_fields.items()
                          if not f.is_required() and type(None) not in typing.get_args(f.annotation)
                          for n in (name, f.alias) if n is not None)
        _DEFAULTED[model] = names
    return names


class StreamOptions(RequestBody):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extra: usage on every chunk; not supported (a 400)


class SamplingFields(RequestBody):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # vLLM's extra: the text ends with the stop string / token
    # vLLM's extra: only the prompt's last k tokens are used (-1: the last max_model_len - 1).
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    # Declared only so that check_common() can name them; see SAMPLING_UNSUPPORTED.
    allowed_token_ids: Any = None
    bad_words: Any = None
    use_beam_search: Any = None
    # Constrained decoding: OpenAI's response_format, or vLLM's structured_outputs extra.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Seconds from arrival (queue time included) before generation is stopped: 408, or an error
    # event in a stream. An extra field (vLLM-style `extra_body`); --request-timeout caps it.
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False, strict=True)

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < SEED_LIMIT:
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1] = [0, {SEED_LIMIT - 1}]; got {value}")
        return value

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def truncated(self, token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt's token ids as truncate_prompt_tokens keeps them (its last k)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return token_ids
        if k == -1:
            k = max_model_len - 1
        if k == 0:
            raise invalid_param("truncate_prompt_tokens", "truncate_prompt_tokens must be -1 or at least 1")
        return token_ids[-k:]

    def check_common(self, raw: bytes | None = None) -> None:
        if raw is None or may_hold_surrogates(raw):
            check_text(self)
        reject_unsupported(self, SAMPLING_UNSUPPORTED)
        stops = self.stop_strings
        if any(s == "" for s in stops):
            raise invalid_param("stop", "stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid_param("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed; got {len(stops)}")
        longest = max(stops, key=len, default="")
        if len(longest) > MAX_STOP_STRING_CHARS:
            raise invalid_param("stop", f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters; "
                                f"stop[{stops.index(longest)}] has {len(longest)}")
        num_stop_ids = len(self.stop_token_ids or ())
        if num_stop_ids > MAX_STOP_TOKEN_IDS:
            raise invalid_param("stop_token_ids",
                                f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed; got {num_stop_ids}")
        if self.stream_options is not None and not self.stream:
            raise invalid_param("stream_options", "stream_options is only allowed when stream is true")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise invalid_param("stream_options.continuous_usage_stats", "continuous_usage_stats is not supported "
                                "by this server: include_usage gives the usage once, in the last chunk")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise invalid_param("response_format.json_schema",
                                "response_format of type 'json_schema' needs a 'json_schema' object (name, schema)")
        if fmt is not None and fmt.json_schema is not None and fmt.json_schema.schema_ is not None:
            check_schema_size("response_format.json_schema.schema", fmt.json_schema.schema_)
        shaped = self.structured_outputs
        if shaped is not None and (shaped.regex is None) == (shaped.grammar is None):
            raise invalid_param("structured_outputs", "structured_outputs needs exactly one of regex, grammar")
        if shaped is not None and fmt is not None and fmt.type != "text":
            raise invalid_param("structured_outputs", "structured_outputs and response_format cannot be used together")


# OpenAI's rule for function and response-format names.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class MessageToolCall(BaseModel):
    """A call an earlier assistant message made (conversation history)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    # An earlier assistant turn's reasoning (vLLM's field; `reasoning` is its newer name): templates
    # that render past reasoning (Qwen3, gpt-oss) read `reasoning_content`.
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # accepted; calls forced by tool_choice always follow the schema


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # accepted; the output always follows the schema


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extra: the output matches a regular expression or a Lark grammar."""

    model_config = ConfigDict(extra="forbid")

    regex: str | None = Field(default=None, max_length=MAX_SCHEMA_CHARS)
    grammar: str | None = Field(default=None, max_length=MAX_SCHEMA_CHARS)  # Lark syntax (llguidance's)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


# OpenAI fields whose effect this server cannot honour. Each maps to the values that mean
# "the feature is off" and are therefore accepted.
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": ([],),  # the legacy form of `tools`
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "verbosity": (),
    "store": (False,),
    "echo": (False,),
}

COMPLETION_UNSUPPORTED: dict[str, tuple[Any, ...]] = {}
# vLLM's sampling extras this server does not implement: a 400 rather than an output they did not shape.
SAMPLING_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "allowed_token_ids": (),
    "bad_words": ([],),
    "use_beam_search": (False,),
}

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# apply_chat_template's own arguments (and what the server renders): not template variables.
TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # vLLM's extra field: each prompt token's log-probability and this many alternatives.
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Passed to the chat template, as vLLM does: extra variables (e.g. {"enable_thinking": false}), and
    # OpenAI's reasoning_effort as the variable of that name (gpt-oss templates read it).
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # vLLM's extras: render the template without the assistant turn's opening, or (continue_final_message)
    # with the last message, an assistant's, left open for the model to continue.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: Any = None  # vLLM's chat echo: not supported (see CHAT_UNSUPPORTED)
    include_reasoning: bool = True  # vLLM's extra: false leaves the reasoning out (it is still not content)
    # Declared only so that check() can name them; see CHAT_UNSUPPORTED.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
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

    def check(self, raw: bytes | None = None) -> None:
        """400 for what the schema cannot say. `raw`: the JSON body the request was parsed from, when
        known (it spares most requests the walk for lone surrogates)."""
        self.check_common(raw)
        reject_unsupported(self, CHAT_UNSUPPORTED)
        if self.continue_final_message and self.add_generation_prompt:
            raise invalid_param("continue_final_message", "continue_final_message needs add_generation_prompt: false "
                                "(the last message is continued, no new assistant turn is opened)")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise invalid_param("continue_final_message", "continue_final_message needs the last message to be the "
                                "assistant's")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_param("top_logprobs", "top_logprobs requires logprobs to be true")
        self._check_tools()

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) < len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise invalid_param("tools", f"two tools are named {dup!r}; function names must be unique")
        total = 0
        for i, tool in enumerate(self.tools or ()):
            params = tool.function.parameters
            if params is not None and params.get("type", "object") != "object":
                raise invalid_param(f"tools[{i}].function.parameters",
                                    "a function's parameters must be a JSON schema of type 'object'")
            if params is not None:
                total += check_schema_size(f"tools[{i}].function.parameters", params)
        if total > MAX_SCHEMA_CHARS:
            raise invalid_param("tools", f"the tools' parameter schemas have {total} characters of JSON together; "
                                f"at most {MAX_SCHEMA_CHARS} are allowed (one grammar covers them all)")
        choice = self.tool_choice
        if choice is None or choice == "none":
            return
        if not names:
            raise invalid_param("tool_choice", "tool_choice is only allowed when tools are specified")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise invalid_param("tool_choice", f"tool_choice names function {choice.function.name!r}, "
                                f"which is not in tools ({', '.join(names)})")

    def template_kwargs(self) -> dict[str, Any]:
        """The chat template's extra variables; 400 for a name apply_chat_template itself takes."""
        kwargs = dict(self.chat_template_kwargs or {})
        taken = sorted(kwargs.keys() & TEMPLATE_ARGUMENTS)
        if taken:
            raise invalid_param("chat_template_kwargs", f"chat_template_kwargs cannot set {', '.join(taken)}: the "
                                "server sets it (use messages, tools and the request's own fields)")
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
        if not self.add_generation_prompt:
            kwargs["add_generation_prompt"] = False
        if self.continue_final_message:
            kwargs["continue_final_message"] = True
        return kwargs

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as the chat template wants them: role, plain-text content and, for tool use,
        the assistant's calls (arguments as objects) and the tool results' call ids."""
        return [message_for_template(i, m) for i, m in enumerate(self.messages)]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's extra field
    # 16 when left out, as OpenAI and vLLM; null: all the room the context leaves. 0: score the prompt
    # only (echo / prompt_logprobs).
    max_tokens: int | None = Field(default=16, ge=0)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None  # fill-in-the-middle: server/api/fim.py (models with FIM tokens)

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

    def check(self, raw: bytes | None = None) -> None:
        """As ChatCompletionRequest.check."""
        self.check_common(raw)
        reject_unsupported(self, COMPLETION_UNSUPPORTED)
        if self.suffix and self.truncate_prompt_tokens is not None:
            raise invalid_param("truncate_prompt_tokens", "truncate_prompt_tokens would cut the fill-in-the-middle "
                                "prompt's own tokens: shorten the prompt or suffix instead")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid_param(
                "best_of", f"best_of={self.best_of} (different from n={self.n}) is not supported; drop it"
            )
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise invalid_param("max_tokens", "max_tokens 0 generates nothing: it is only valid with echo (the "
                                "prompt comes back, with its logprobs when logprobs is set) or prompt_logprobs")

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """How many alternatives the engine gives per prompt token (None: it does not score the
        prompt): echo with logprobs shows them, and max_tokens 0 needs the prompt scored to end."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        if not wanted and self.max_tokens == 0:
            return 0
        return max(wanted, default=None)

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


class TokenizeRequest(RequestBody):
    """vLLM's: a prompt, or messages rendered as the chat endpoint renders them (tools, template
    variables, add_generation_prompt / continue_final_message alike)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = True
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    parallel_tool_calls: bool | None = None
    return_token_strs: bool = False  # the tokens' strings beside their ids

    def chat_request(self) -> ChatCompletionRequest:
        """The messages as a chat completion request (checked as one): its prompt is the count."""
        if not self.messages:
            raise invalid_param("messages", "messages must not be empty")
        chat = ChatCompletionRequest(
            messages=self.messages or [], tools=self.tools, tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
            chat_template_kwargs=self.chat_template_kwargs, reasoning_effort=self.reasoning_effort,
            add_generation_prompt=self.add_generation_prompt, continue_final_message=self.continue_final_message)
        chat.check()
        return chat

    def check(self) -> None:
        check_text(self)


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]

    def check(self) -> None:
        check_text(self)


def reject_unsupported(req: BaseModel, table: dict[str, tuple[Any, ...]]) -> None:
    for name, allowed in table.items():
        value = getattr(req, name)
        if value is None or name not in req.model_fields_set:
            continue
        if any(value == ok for ok in allowed):
            continue
        raise APIError(f"'{name}' is not supported by this server; remove it from the request", 400, param=name)


def message_for_template(i: int, m: ChatMessage) -> dict[str, Any]:
    if m.role not in CHAT_ROLES:
        raise invalid_param(
            f"messages[{i}].role", f"role {m.role!r} is not supported; use one of {', '.join(CHAT_ROLES)}"
        )
    if m.function_call is not None:
        raise invalid_param(f"messages[{i}].function_call", "'function_call' (legacy) is not supported; use tool_calls")
    if m.tool_calls and m.role != "assistant":
        raise invalid_param(f"messages[{i}].tool_calls", "only assistant messages can have tool_calls")
    if m.role == "tool" and m.tool_call_id is None:
        raise invalid_param(f"messages[{i}].tool_call_id", "a tool message needs the tool_call_id it answers")
    # OpenAI's "developer" role is the system role of newer models; templates know "system".
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": message_content(i, m.content)}
    if m.name is not None:
        out["name"] = m.name
    thought = m.reasoning_content if m.reasoning_content is not None else m.reasoning
    if thought is not None and m.role == "assistant":
        out["reasoning_content"] = thought
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in m.tool_calls
        ]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
    return out


def _arguments(text: str) -> Any:
    """Arguments as an object where they parse: chat templates render them with `tojson`."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def message_content(i: int, content: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]]:
    """Text for the template, or, for a message with images, its parts in order: {"type": "image"}
    for each image (the template writes the model's placeholder; server/api/images.py checks the
    images themselves) and {"type": "text", "text": ...}."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
        return message_text(i, content)
    return [{"type": "image"} if isinstance(p, dict) and p.get("type") == "image_url"
            else {"type": "text", "text": _part_text(i, j, p)} for j, p in enumerate(content)]


def message_text(i: int, content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(_part_text(i, j, part) for j, part in enumerate(content))


def _part_text(i: int, j: int, part: dict[str, Any]) -> str:
    kind = part.get("type")
    if kind == "image_url":
        raise invalid_param(f"messages[{i}].content[{j}].type",
                            "an 'image_url' part is not allowed here")
    if kind != "text":
        raise invalid_param(
            f"messages[{i}].content[{j}].type",
            f"content part type {kind!r} is not supported; only 'text' and 'image_url' parts are",
        )
    text = part.get("text")
    if not isinstance(text, str):
        raise invalid_param(f"messages[{i}].content[{j}].text", "a text part needs a string 'text'")
    return text


# Top-level fields that hold token ids (the shape validators make every element of them an int).
_TOKEN_ID_FIELDS = frozenset({"prompt", "stop_token_ids", "tokens"})
_TEXTUAL = (str, list, dict, BaseModel)  # values that are or may hold strings


def check_text(req: BaseModel) -> None:
    """400 naming the first string of the request, at any depth (dict keys too), that is not valid
    Unicode: a lone UTF-16 surrogate such as "\\ud800", which JSON can spell but no tokenizer can encode."""
    stack: list[tuple[str, Any]] = [
        (name, value) for name in reversed(type(req).model_fields)
        if isinstance(value := getattr(req, name), _TEXTUAL)
        and not (name in _TOKEN_ID_FIELDS and isinstance(value, list) and not isinstance(next(iter(value), None), str))
    ]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            _check_string(path, value)
        elif isinstance(value, BaseModel):
            # Only the fields that can hold text get a path (most are numbers or None: every request
            # walks the whole model).
            fields = type(value).model_fields
            stack += [(f"{path}.{info.alias or name}", item) for name, info in reversed(fields.items())
                      if isinstance(item := getattr(value, name), _TEXTUAL)]
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                key_path = f"{path}.{_printable(key)}" if isinstance(key, str) else f"{path}[{key}]"
                stack += [(key_path, item), (key_path, key)]  # the key is checked first
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value)))
                      if isinstance(item, str | list | dict | BaseModel)]


# How a lone surrogate gets into a parsed string: a JSON escape of one (\ud800 to \udfff), or its
# three bytes in UTF-8's pattern (ED A0 80 to ED BF BF), which json.loads accepts (it decodes bytes
# with surrogatepass). A NUL byte means UTF-16 or UTF-32 text (a JSON object's "{" has one there; in
# UTF-8 JSON a NUL must be escaped), where a surrogate is two plain bytes: those bodies are walked.
_SURROGATE_SOURCE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]|\x00")


def may_hold_surrogates(raw: bytes) -> bool:
    """Whether a string parsed from the JSON body `raw` may hold a lone surrogate: False for nearly
    every request (one scan of the bytes in C), which then skips check_text's walk of the model.
    An escaped surrogate pair (a character past U+FFFF in ASCII-only JSON) counts as possible too:
    such a body is walked, which is never wrong, only slower."""
    return _SURROGATE_SOURCE.search(raw) is not None


def _check_string(path: str, text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start].encode("unicode_escape").decode("ascii")
        raise invalid_param(path, f"{path} is not valid Unicode text: it has a lone UTF-16 surrogate ({char} at "
                            f"character {exc.start}); send text as UTF-8, or a surrogate pair together "
                            "(\\ud83d\\ude00)") from None


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def schema_depth(schema: Any, limit: int) -> int:
    """How many object / array levels `schema` nests (without recursion: a deep document must not
    overflow the stack); counting stops past `limit`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, dict | list):
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return deepest
        stack += [(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


def check_schema_size(param: str, schema: Any) -> int:
    """400 unless the schema nests at most MAX_SCHEMA_DEPTH levels and has at most MAX_SCHEMA_CHARS
    characters of compact JSON; returns that size."""
    if schema_depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise invalid_param(param, f"{param} nests more than {MAX_SCHEMA_DEPTH} levels of objects and arrays; "
                            f"at most {MAX_SCHEMA_DEPTH} are allowed")
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_CHARS:
        raise invalid_param(param, f"{param} has {size} characters of JSON; at most {MAX_SCHEMA_CHARS} are allowed")
    return size
