"""Grammars of constrained output in the model's own format (llguidance Lark):

- a forced tool call (tool_choice "required" or a named function) of a model whose chat template
  teaches Hermes-style calls is written as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`
  blocks, the way it was trained to call, instead of the bare JSON of the generic tool prompt; one
  whose template teaches Llama 3's JSON calls writes `{"name": ..., "parameters": {...}}` objects
  separated by `; `, as that template asks; gpt-oss (harmony) writes its analysis (optional, free)
  then one `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>`
  message, the markers as its special tokens (`<|call|>` ends its turn: one call per turn); Mistral
  writes `[TOOL_CALLS]name[ARGS]{...}` per call where its tokenizer has `[ARGS]`, else
  `[TOOL_CALLS]` and a JSON list of calls (its markers named by token id: `<[id]>`);
- for a thinking model (`<think>` reasoning), the JSON grammar (forced call or response_format) starts
  after the reasoning section, which stays free text: optional when the model opens it itself,
  required to close when the template opened it in the prompt.
Other output keeps the plain JSON-schema grammar.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine.sampling_params import StructuredSpec
from .tool_formats import HERMES, LLAMA3_JSON, MISTRAL
from .tool_request import ToolPlan

# The reasoning: any text up to the first `</think>` (lazy: it ends there).
_THOUGHT = "thought[lazy]: /(?s:.*)<\\/think>/"


def _literal(text: str) -> str:
    return json.dumps(text)


def hermes_calls(plan: ToolPlan, schema: dict[str, Any]) -> str:
    """Lark rules `calls` of forced calls as `<tool_call>` blocks; `schema` is tools.call_spec's."""
    if plan.mode == "named":
        one = schema  # one call object (with its $defs)
        many = False
    else:
        one = {**schema["items"], "$defs": schema["$defs"]}
        many = plan.parallel
    rules = [
        "calls: call" + (" (/\\s*/ call)*" if many else ""),
        f"call: {_literal(HERMES.opens + chr(10))} call_json {_literal(chr(10) + (HERMES.closes or ''))}",
        f"call_json: %json {json.dumps(one)}",
    ]
    return "\n".join(rules)


def _with_parameters(call: dict[str, Any]) -> dict[str, Any]:
    """A call object's schema with Llama 3's key for the arguments."""
    if "anyOf" in call:
        return {**call, "anyOf": [_with_parameters(c) for c in call["anyOf"]]}
    props = {("parameters" if k == "arguments" else k): v for k, v in call["properties"].items()}
    required = ["parameters" if k == "arguments" else k for k in call["required"]]
    return {**call, "properties": props, "required": required}


def llama3_calls(plan: ToolPlan, schema: dict[str, Any]) -> str:
    """Lark rules `calls` of forced calls as Llama 3 JSON objects, `; `-separated."""
    if plan.mode == "named":
        one, many = _with_parameters(schema), False
    else:
        one, many = {**_with_parameters(schema["items"]), "$defs": schema["$defs"]}, plan.parallel
    return "\n".join([
        "calls: call" + (" (/\\s*;\\s*/ call)*" if many else ""),
        f"call: %json {json.dumps(one)}",
    ])


def harmony_calls(plan: ToolPlan, schema: dict[str, Any]) -> str:
    """Lark rules `calls` of a forced harmony call: the analysis, then one call of an allowed function."""
    names = [plan.name] if plan.mode == "named" and plan.name is not None else plan.names
    rules = [
        'calls: (<|channel|> "analysis" <|message|> analysis <|end|> <|start|> "assistant")? call',
        "analysis: /(?s:.*)/",  # free text: the markers are special tokens, never part of it
        "call: " + " | ".join(f"call_{i}" for i in range(len(names))),
    ]
    for i, name in enumerate(names):
        args = {"$ref": f"#/$defs/fn_{name}", "$defs": schema["$defs"]}
        rules += [f'call_{i}: <|channel|> {_literal(f"commentary to=functions.{name} ")} <|constrain|> "json" '
                  f"<|message|> args_{i} <|call|>", f"args_{i}: %json {json.dumps(args)}"]
    return "\n".join(rules)


def mistral_calls(plan: ToolPlan, schema: dict[str, Any], tokens: dict[str, int]) -> str:
    """Lark rules `calls` of forced Mistral calls; `tokens`: its markers' special token ids."""
    opens = f"<[{tokens[MISTRAL.opens]}]>"
    if "[ARGS]" in tokens:
        names = [plan.name] if plan.mode == "named" and plan.name is not None else plan.names
        many = plan.mode == "required" and plan.parallel
        rules = ["calls: call" + ("+" if many else ""), "call: " + " | ".join(f"call_{i}" for i in range(len(names)))]
        for i, name in enumerate(names):
            args = {"$ref": f"#/$defs/fn_{name}", "$defs": schema["$defs"]}
            rules += [f"call_{i}: {opens} {_literal(name)} <[{tokens['[ARGS]']}]> args_{i}",
                      f"args_{i}: %json {json.dumps(args)}"]
        return "\n".join(rules)
    if plan.mode == "named":  # one call, as the list the format has
        one = {k: v for k, v in schema.items() if k != "$defs"}
        schema = {"type": "array", "items": one, "minItems": 1, "maxItems": 1, "$defs": schema["$defs"]}
    return f"calls: {opens} call_list\ncall_list: %json {json.dumps(schema)}"


def shape(spec: StructuredSpec, plan: ToolPlan | None, hermes: bool, think: str | None,
          family: str | None = None, tokens: dict[str, int] | None = None) -> StructuredSpec:
    """`spec` (a JSON-schema grammar) in the model's format. `hermes`: forced calls as `<tool_call>`
    blocks; `family`: the forced calls' format by name (hermes, llama3_json, mistral, harmony), None: bare
    JSON; `tokens`: the format's markers that are special tokens, with their ids;
    `think`: None (no reasoning), "open" (the prompt opened `<think>`) or "optional"."""
    family = HERMES.name if hermes else family
    native = family in (HERMES.name, LLAMA3_JSON.name, MISTRAL.name, "harmony") and plan is not None and plan.is_forced
    if family == MISTRAL.name and MISTRAL.opens not in (tokens or {}):
        native = False  # its marker must be named by token id
    if spec.kind != "json" or not (native or think):
        return spec
    if native:
        assert plan is not None
        schema = json.loads(spec.json_schema)
        if family == MISTRAL.name:
            body = mistral_calls(plan, schema, tokens or {})
        else:
            build = {HERMES.name: hermes_calls, LLAMA3_JSON.name: llama3_calls}.get(family or "", harmony_calls)
            body = build(plan, schema)
    else:
        body = f"calls: %json {spec.json_schema}"
    if think == "open":
        start = "start: thought /\\s*/ calls"
    elif think == "optional":
        start = f"start: ({_literal('<think>')} thought /\\s*/)? calls"
    else:
        start = "start: calls"
    rules = [start, *([_THOUGHT] if think else []), body]
    return StructuredSpec("\n".join(rules), kind="lark")
