"""Request fields to the engine's SamplingParams; its validation errors become 400s."""

from __future__ import annotations

from server.api.errors import APIError, invalid_param
from server.api.generation import ChoiceRequest
from server.api.protocol import SamplingFields
from server.engine.sampling_params import SamplingParams


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
    req: SamplingFields, max_tokens: int, logprobs: int | None, vocab_size: int, choice: int = 0
) -> SamplingParams:
    """SamplingParams for choice number `choice` of the request: seeds differ per choice so that
    n > 1 with a seed gives n different (but reproducible) samples."""
    bad_stop_ids = [t for t in req.stop_token_ids or () if not 0 <= t < vocab_size]
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
            seed=None if req.seed is None else req.seed + choice,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=parse_logit_bias(req.logit_bias, vocab_size),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as exc:
        raise APIError(str(exc), 400) from exc


def choice_requests(
    req: SamplingFields,
    response_id: str,
    prompts: list[tuple[list[int], int]],
    logprobs: int | None,
    adapter_id: int,
    vocab_size: int,
) -> list[ChoiceRequest]:
    """One engine request per (prompt, choice): `prompts` holds (token ids, max_tokens) pairs, and
    choice j of prompt p gets index p * n + j and engine id `{response_id}-{index}`."""
    out = []
    for p, (token_ids, max_tokens) in enumerate(prompts):
        for j in range(req.n):
            index = p * req.n + j
            params = build_params(req, max_tokens, logprobs, vocab_size, choice=j)
            out.append(
                ChoiceRequest(
                    index=index,
                    request_id=f"{response_id}-{index}",
                    prompt_token_ids=token_ids,
                    params=params,
                    adapter_id=adapter_id,
                    stop=tuple(req.stop_strings),
                    skip_special_tokens=req.skip_special_tokens,
                )
            )
    return out
