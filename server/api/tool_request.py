"""Tool use in chat, request side: which calls the request allows or forces (tool_choice), the
grammar that forces them, and the prompt that shows the tools to the model.

Output format. A forced call is the JSON object `{"name": "<function>", "arguments": {...}}`
(tool_choice naming a function) or a JSON list of such objects (tool_choice "required"; one item at
most when parallel_tool_calls is false); the grammar makes the arguments valid against the
function's parameters. With tool_choice "auto" the model may answer in text or write calls in that
format, bare or inside Hermes-style `<tool_call>...</tool_call>` blocks (what tool-aware ChatML
templates teach); server/api/tool_call_reader.py reads them. tool_choice "none" hides the tools.

Prompt. A chat template that knows tools (its source mentions `tools`) gets them as it expects
(`apply_chat_template(..., tools=...)`). Any other template gets a system message, first in the
conversation (merged into the system message if there is one):

    # Tools

    You can call these functions. Each line is one function as JSON: its name, description and the
    JSON schema of its arguments.
    {"name": "get_weather", "description": "...", "parameters": {...}}

    <what tool_choice asks for, e.g. 'Reply with only a JSON list of function calls, each
    {"name": <function name>, "arguments": <arguments object>}, and nothing else.'>

and the history is written in the same format: an assistant message's tool calls become its text
(the JSON list of calls) and a tool result becomes a user message `Result of call <id>:\\n<content>`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal

from ..engine.client import StructuredSpec
from .engine_params import close_objects
from .errors import invalid_param
from .prompts import encode_chat
from .protocol import ChatCompletionRequest, NamedToolChoice

ToolMode = Literal["auto", "required", "named"]

TOOLS_HEADER = (
    "# Tools\n\nYou can call these functions. Each line is one function as JSON: its name, description "
    "and the JSON schema of its arguments.\n"
)
CALL_FORMAT = '{"name": <function name>, "arguments": <arguments object>}'


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """The tools a chat request offers and what tool_choice asks of the model."""

    tools: list[dict[str, Any]]  # OpenAI's tool objects {type: function, function: {...}}
    mode: ToolMode
    name: str | None = None  # the function a named tool_choice forces
    parallel: bool = True

    @property
    def is_forced(self) -> bool:
        return self.mode != "auto"

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def parameters(self, name: str) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or {"type": "object", "properties": {}}

    def instructions(self) -> str:
        if self.mode == "named":
            call = CALL_FORMAT.replace("<function name>", json.dumps(self.name))
            return f'Reply with only a call of the function "{self.name}" as one JSON object {call}, and nothing else.'
        if self.mode == "required":
            many = "function calls, each" if self.parallel else "exactly one function call,"
            return f"Reply with only a JSON list of {many} {CALL_FORMAT}, and nothing else."
        return f"To call functions, reply with only a JSON list of calls, each {CALL_FORMAT}. Otherwise answer normally."


def plan_tools(body: ChatCompletionRequest) -> ToolPlan | None:
    """None when the request has no tools or tool_choice is "none" (checked by body.check())."""
    choice = body.tool_choice
    if not body.tools or choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        return ToolPlan(tools, "named", choice.function.name, parallel)
    return ToolPlan(tools, "required" if choice == "required" else "auto", None, parallel)


def call_spec(plan: ToolPlan) -> StructuredSpec | None:
    """The grammar of a forced call, None for "auto". Each function's parameters move under
    `$defs/fn_<name>`, their internal `$ref`s rewritten to point there, so that they resolve."""
    if not plan.is_forced:
        return None
    defs = {f"fn_{n}": _rebase_refs(close_objects(plan.parameters(n)), f"#/$defs/fn_{n}") for n in plan.names}

    def call(name: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/fn_{name}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    if plan.mode == "named":
        assert plan.name is not None
        schema: dict[str, Any] = {**call(plan.name), "$defs": {f"fn_{plan.name}": defs[f"fn_{plan.name}"]}}
    else:
        items = call(plan.names[0]) if len(plan.names) == 1 else {"anyOf": [call(n) for n in plan.names]}
        schema = {"type": "array", "items": items, "minItems": 1, "$defs": defs}
        if not plan.parallel:
            schema["maxItems"] = 1
    return StructuredSpec(json.dumps(schema))


def _rebase_refs(schema: Any, base: str) -> Any:
    if isinstance(schema, list):
        return [_rebase_refs(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _rebase_refs(v, base) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = base + ref[1:]
    return out


def template_knows_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


async def encode_tool_chat(tokenizer: Any, conversation: list[dict[str, Any]], plan: ToolPlan | None,
                           template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of the conversation with the tools shown the way the template can take them;
    `template_kwargs`: the template's extra variables (chat_template_kwargs, reasoning_effort)."""
    if template_knows_tools(tokenizer):
        if plan is None:
            return await encode_chat(tokenizer, conversation, True, template_kwargs)  # type: ignore[arg-type]
        return await asyncio.to_thread(_render_with_tools, tokenizer, conversation, plan.tools, template_kwargs)
    conversation = [_as_text(m) for m in conversation]
    if plan is not None:
        conversation = _with_tools_message(conversation, plan)
    return await encode_chat(tokenizer, conversation, True, template_kwargs)  # type: ignore[arg-type]


def _render_with_tools(tokenizer: Any, conversation: list[dict[str, Any]], tools: list[dict[str, Any]],
                       template_kwargs: dict[str, Any] | None) -> list[int]:
    kwargs = {"add_generation_prompt": True, **(template_kwargs or {})}
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, **kwargs)
    except Exception as exc:  # jinja raises on conversations a template rejects
        raise invalid_param("messages", f"the chat template rejected these messages: {exc}") from exc
    return list(tokenizer.encode(str(text), add_special_tokens=False))


def _with_tools_message(conversation: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    lines = [json.dumps({k: t["function"][k] for k in ("name", "description", "parameters") if k in t["function"]})
             for t in plan.tools]
    text = TOOLS_HEADER + "\n".join(lines) + "\n\n" + plan.instructions()
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *conversation[1:]]
    return [{"role": "system", "content": text}, *conversation]


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    """A tool-use message in plain text, for templates that know nothing of tools."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"Result of call {message['tool_call_id']}:\n{message['content']}"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    listed = json.dumps([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls])
    content = f"{message['content']}\n{listed}" if message["content"] else listed
    return {"role": message["role"], "content": content}
