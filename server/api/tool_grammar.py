"""Grammars of constrained output in the model's own format (llguidance Lark):

- a forced tool call (tool_choice "required" or a named function) of a model whose chat template
  teaches Hermes-style calls is written as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`
  blocks, the way it was trained to call, instead of the bare JSON of the generic tool prompt;
- for a thinking model (`<think>` reasoning), the JSON grammar (forced call or response_format) starts
  after the reasoning section, which stays free text: optional when the model opens it itself,
  required to close when the template opened it in the prompt.
Other output keeps the plain JSON-schema grammar.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.tool_formats import HERMES
from server.api.tools import ToolPlan
from server.engine.sampling_params import StructuredSpec

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


def shape(spec: StructuredSpec, plan: ToolPlan | None, hermes: bool, think: str | None) -> StructuredSpec:
    """`spec` (a JSON-schema grammar) in the model's format. `hermes`: forced calls as `<tool_call>`
    blocks; `think`: None (no reasoning), "open" (the prompt opened `<think>`) or "optional"."""
    forced_hermes = hermes and plan is not None and plan.is_forced
    if spec.kind != "json" or not (forced_hermes or think):
        return spec
    if forced_hermes:
        assert plan is not None
        body = hermes_calls(plan, json.loads(spec.json_schema))
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
