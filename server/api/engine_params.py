"""Request fields to the engine's SamplingParams; its validation errors become 400s. Structured
output (response_format, forced tool calls) becomes a StructuredSpec compiled here, off the event
loop and off the engine thread, so that an invalid schema is a 400 that names the problem."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..engine.client import SamplingParams, StructuredSpec
from ..engine.grammar import GrammarError
from ..engine.request_fit import out_of_vocab
from .choice_stream import ChoiceRequest
from .errors import APIError, invalid_param
from .protocol import SEED_LIMIT, ResponseFormat, SamplingFields

if TYPE_CHECKING:
    from .runtime import Runtime

# Keywords whose values are data, not subschemas: close_objects() leaves them alone.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "required"})


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    if not bias:
        return {}
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid_param("logit_bias", f"logit_bias keys must be token ids; got {key!r}") from None
        if not 0 <= token < vocab_size:
            raise invalid_param("logit_bias", f"logit_bias token id {token} is not in [0, {vocab_size})")
        if not -100 <= value <= 100:
            raise invalid_param("logit_bias", f"logit_bias values must be in [-100, 100]; got {value}")
        out[token] = value
    return out


def build_params(
    req: SamplingFields, max_tokens: int, logprobs: int | None, vocab_size: int, choice: int = 0,
    structured: StructuredSpec | None = None, prompt_logprobs: int | None = None,
) -> SamplingParams:
    """SamplingParams for choice number `choice` of the request: seeds differ per choice so that
    n > 1 with a seed gives n different (but reproducible) samples; they wrap at 2**63, so a seed
    near the top of its range still names a valid one for every choice."""
    bad_stop_ids = out_of_vocab(req.stop_token_ids or (), vocab_size)
    if bad_stop_ids:
        raise invalid_param("stop_token_ids", f"stop_token_ids must be in [0, {vocab_size}); got {bad_stop_ids[:3]}")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=None if req.seed is None else (req.seed + choice) % SEED_LIMIT,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=parse_logit_bias(req.logit_bias, vocab_size),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured=structured,
        )
    except ValueError as exc:  # "<field> must ..." names the field; other messages name several
        field, _, rest = str(exc).partition(" ")
        param = field if field in SamplingFields.model_fields and rest.startswith("must") else None
        raise APIError(str(exc), 400, param=param) from exc


def choice_requests(
    req: SamplingFields,
    response_id: str,
    prompts: list[tuple[list[int], int]],
    logprobs: int | None,
    adapter_id: int,
    vocab_size: int,
    structured: StructuredSpec | None = None,
    eos_token_ids: frozenset[int] | None = None,
    prompt_logprobs: int | None = None,
) -> list[ChoiceRequest]:
    """One engine request per (prompt, choice): `prompts` holds (token ids, max_tokens) pairs, and
    choice j of prompt p gets index p * n + j and engine id `{response_id}-{index}`."""
    out = []
    for p, (token_ids, max_tokens) in enumerate(prompts):
        for j in range(req.n):
            index = p * req.n + j
            params = build_params(req, max_tokens, logprobs, vocab_size, choice=j, structured=structured,
                                  prompt_logprobs=prompt_logprobs)
            out.append(
                ChoiceRequest(
                    index=index,
                    request_id=f"{response_id}-{index}",
                    prompt_token_ids=token_ids,
                    params=params,
                    adapter_id=adapter_id,
                    stop=tuple(req.stop_strings),
                    include_stop=req.include_stop_str_in_output,
                    skip_special_tokens=req.skip_special_tokens,
                    eos_token_ids=eos_token_ids,
                )
            )
    return out


def format_spec(body: SamplingFields, format_param: str = "response_format.json_schema.schema",
                ) -> tuple[StructuredSpec, str, bool] | None:
    """The request's constraint on its output, not compiled: (spec, the field an error names, whether
    it is a response format, which a chat model's own reasoning may precede), or None."""
    shaped = body.structured_outputs
    if shaped is not None and shaped.regex is not None:
        return StructuredSpec(shaped.regex, kind="regex"), "structured_outputs.regex", False
    if shaped is not None and shaped.grammar is not None:
        return StructuredSpec(shaped.grammar, kind="lark"), "structured_outputs.grammar", False
    spec = response_format_spec(body.response_format)
    return None if spec is None else (spec, format_param, True)


def response_format_spec(fmt: ResponseFormat | None) -> StructuredSpec | None:
    """`json_object`: any JSON object; `json_schema`: a document valid against the schema (without a
    schema, any JSON object); `text` or none: no constraint."""
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    if fmt.type == "json_object" or schema is None:
        return StructuredSpec.json_object()
    return StructuredSpec(json.dumps(close_objects(schema)))


def close_objects(schema: Any) -> Any:
    """The schema where every object that lists its properties takes no others unless it says so
    (additionalProperties / patternProperties), as in OpenAI's strict mode. Outputs stay valid
    against the original schema; a weak model just has no room to invent keys forever."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else close_objects(v) for k, v in schema.items()}
    opened = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if isinstance(schema.get("properties"), dict) and not any(k in schema for k in opened):
        out["additionalProperties"] = False
    return out


async def compile_spec(runtime: Runtime, spec: StructuredSpec, param: str) -> StructuredSpec:
    """`spec` with its grammar compiled (in a worker thread); a 400 naming `param` if it cannot be.
    An engine in a thread uses this compiled grammar; an engine process compiles its own."""
    try:
        if runtime.grammar is None:
            raise GrammarError(runtime.grammar_error or "no grammar compiler")
        compiled = await asyncio.to_thread(runtime.grammar.compile, spec)
    except GrammarError as exc:
        raise invalid_param(param, f"{param} cannot be used for constrained decoding: {exc}") from None
    return replace(spec, compiled=compiled)
