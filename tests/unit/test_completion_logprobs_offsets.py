"""/v1/completions logprobs on the demo tokenizer, without a model: the server's own completion code
(whole and streamed) driven by a scripted engine, so that a choice can be made to hold characters
split over several tokens (byte-level BPE gives "😀" four). Every generated token's top_logprobs
holds the sampled token itself, as OpenAI's and vLLM's do (up to logprobs + 1 entries), and
text_offset is where each token's text starts in the choice's text (the echoed prompt's and the
generated tokens' alike): never going back, and the first generated token's at the echo's end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from queued_engine import QueuedEngine
from transformers import AutoTokenizer

from sloth_serve.api.choice_stream import ChoiceRequest
from sloth_serve.api.engine_params import choice_requests
from sloth_serve.api.logprobs import TextOffsets, TokenTexts, completion_logprobs, prompt_text_offsets
from sloth_serve.api.protocol import CompletionRequest
from sloth_serve.api.serving_completions import _completion_events, _completion_response
from sloth_serve.api.tokenizers import ModelTokenizer
from sloth_serve.engine.client import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from sloth_serve.loader import DEMO_MODEL

PROMPT = "😀 héllo"
GENERATED = "é😀 ok ✓"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


def reference_offsets(tokenizer: Any, ids: list[int], skip_special_tokens: bool = False) -> list[int]:
    """Token i's offset the slow way: the characters that the tokens before it decode to whole (a
    character they only begin decodes to U+FFFD, dropped here)."""
    return [len(tokenizer.decode(ids[:i], skip_special_tokens=skip_special_tokens).rstrip("\ufffd"))
            for i in range(len(ids))]


def test_a_prompt_with_split_characters_has_offsets_into_its_text(tokenizer: Any) -> None:
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    offsets = prompt_text_offsets(tokenizer, ids, PROMPT)
    assert len(ids) > len(PROMPT)  # the premise: characters split over tokens
    assert offsets == reference_offsets(tokenizer, ids) == [0, 0, 0, 0, 1, 3, 3, 4, 6]


def test_special_tokens_count_only_where_the_echoed_text_shows_them(tokenizer: Any) -> None:
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = [special, *tokenizer.encode(PROMPT, add_special_tokens=False)]
    # A token-id prompt echoes its decoding, special token included.
    shown = tokenizer.decode(ids)
    assert shown == "<|im_start|>" + PROMPT
    assert prompt_text_offsets(tokenizer, ids, shown) == reference_offsets(tokenizer, ids)
    # A text prompt echoes its own string: a special token its encoding added (a BOS) has no text.
    assert prompt_text_offsets(tokenizer, ids, PROMPT) == [0, 0, 0, 0, 0, 1, 3, 3, 4, 6]


def test_offsets_stay_within_a_text_the_tokens_do_not_decode_to(tokenizer: Any) -> None:
    ids = tokenizer.encode("hello there, world", add_special_tokens=False)
    offsets = prompt_text_offsets(tokenizer, ids, "hi")
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= 2


def test_generated_offsets_follow_the_decoded_text_across_calls(tokenizer: Any) -> None:
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode(GENERATED, add_special_tokens=False)
    offsets = TextOffsets(tokenizer, start=5)
    items = [TokenLogprob(t, -1.0, []) for t in ids]
    got = completion_logprobs(texts, items[:3], offsets).text_offset + completion_logprobs(texts, items[3:], offsets).text_offset
    assert got == [5 + o for o in reference_offsets(tokenizer, ids)]


def test_top_logprobs_hold_the_sampled_token(tokenizer: Any) -> None:
    texts = TokenTexts(tokenizer)
    value, of = tokenizer.encode(" value of", add_special_tokens=False)
    items = [TokenLogprob(of, -8.0, [(value, -2.4)]),  # sampled outside the top 1: two entries
             TokenLogprob(value, -0.1, [(value, -0.1)]),  # the top token itself: one
             TokenLogprob(of, -3.0, [])]  # logprobs 0: the sampled token alone
    lp = completion_logprobs(texts, items, TextOffsets(tokenizer))
    assert lp.top_logprobs == [{" value": -2.4, " of": -8.0}, {" value": -0.1}, {" of": -3.0}]
    assert lp.token_logprobs == [-8.0, -0.1, -3.0] and lp.tokens == [" of", " value", " of"]


class ScriptedEngine(QueuedEngine):
    """Every request generates GENERATED's tokens, two an output, each released once the reader has
    taken the one before (so a stream gets several deltas). Logprobs: the sampled token at -1, with
    ` the` as top alternative at even positions and the sampled token itself at odd ones; the
    prompt's, when asked, the same way."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.output_ids: list[int] = tokenizer.encode(GENERATED, add_special_tokens=False)
        self.other: int = tokenizer.encode(" the", add_special_tokens=False)[0]

    def logprob(self, token_id: int, j: int, k: int | None, rank: int | None = None) -> TokenLogprob:
        top = [(self.other if j % 2 == 0 else token_id, -0.5 if j % 2 == 0 else -1.0)][:k]
        return TokenLogprob(token_id, -1.0, top, rank)

    def _send_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: int,
                  eos_token_ids: frozenset[int] | None, mm: Any, system_prompt_end: int) -> None:
        k = params.logprobs
        outputs = []
        for start in range(0, len(self.output_ids), 2):
            chunk = self.output_ids[start : start + 2]
            last = start + 2 >= len(self.output_ids)
            outputs.append(RequestOutput(request_id, chunk, last, FinishReason.LENGTH if last else None,
                                         new_logprobs=[] if k is None else [self.logprob(t, start + i, k)
                                                                            for i, t in enumerate(chunk)]))
        if params.prompt_logprobs is not None:
            outputs[0].prompt_logprobs = [self.logprob(t, j, params.prompt_logprobs, rank=1)
                                          for j, t in enumerate(prompt_token_ids[1:])]
        self.release(request_id, outputs)


def run_completion(tokenizer: Any, prompt: str | list[int], **fields: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The whole response's choices, and the streamed chunks' choices merged per index."""
    body = CompletionRequest.model_validate({"model": "base", "prompt": prompt, **fields})
    tokens = ModelTokenizer(tokenizer, TokenTexts(tokenizer), frozenset({2}), "none", "base")
    ids = tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
    echo = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if body.echo else ""
    echoes = [echo] * body.n

    def requests() -> list[ChoiceRequest]:
        return choice_requests(body, "cmpl-test", [(ids, 16)], body.logprobs, 0, len(tokenizer),
                               prompt_logprobs=body.engine_prompt_logprobs)

    async def whole() -> dict[str, Any]:
        engine = ScriptedEngine(tokenizer)
        response = await _completion_response(engine, tokens, body, requests(), echoes, len(ids), "cmpl-test",
                                              "base", None)
        return response.model_dump()

    async def streamed() -> list[dict[str, Any]]:
        engine = ScriptedEngine(tokenizer)
        events = [e async for e in _completion_events(engine, tokens, body, requests(), echoes, len(ids),
                                                      "cmpl-test", "base", None)]
        assert events[-1] == "[DONE]"  # each event is an SSE message's data
        merged = [{"text": "", "logprobs": None} for _ in range(body.n)]
        for event in events[:-1]:
            chunk = json.loads(event)
            assert len(chunk["choices"]) == 1
            piece = chunk["choices"][0]
            choice = merged[piece["index"]]
            choice["text"] += piece["text"]
            if piece.get("logprobs"):
                if choice["logprobs"] is None:
                    choice["logprobs"] = {key: [] for key in piece["logprobs"]}
                for key, values in piece["logprobs"].items():
                    choice["logprobs"][key] += values
        return merged

    response = asyncio.run(whole())
    return response, asyncio.run(streamed())


@pytest.mark.parametrize("n", [1, 2])
def test_echoed_text_prompt_and_generated_tokens_offsets(tokenizer: Any, n: int) -> None:
    response, streamed = run_completion(tokenizer, PROMPT, echo=True, logprobs=1, n=n)
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    output_ids = tokenizer.encode(GENERATED, add_special_tokens=False)
    assert len(response["choices"]) == n
    for choice, merged in zip(response["choices"], streamed, strict=True):
        assert choice["text"] == merged["text"] == PROMPT + GENERATED
        lp = choice["logprobs"]
        assert lp == merged["logprobs"]  # streamed as whole
        assert len(lp["tokens"]) == len(lp["text_offset"]) == len(prompt_ids) + len(output_ids)
        assert lp["text_offset"] == reference_offsets(tokenizer, prompt_ids + output_ids)
        assert lp["text_offset"] == sorted(lp["text_offset"])
        assert lp["text_offset"][len(prompt_ids)] == len(PROMPT)  # the first generated token: after the echo
        assert lp["top_logprobs"][0] is None
        for j, (token, logprob, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                                      strict=True)):
            if j > 0:
                assert top[token] == logprob and len(top) <= 2


def test_echoed_token_id_prompt_with_a_special_token(tokenizer: Any) -> None:
    ids = [tokenizer.convert_tokens_to_ids("<|im_start|>"), *tokenizer.encode(PROMPT, add_special_tokens=False)]
    response, streamed = run_completion(tokenizer, ids, echo=True, logprobs=0)
    [choice], [merged] = response["choices"], streamed
    echo = tokenizer.decode(ids)
    assert choice["text"] == merged["text"] == echo + GENERATED
    lp = choice["logprobs"]
    assert lp == merged["logprobs"]
    assert lp["text_offset"] == reference_offsets(tokenizer, ids + tokenizer.encode(GENERATED, add_special_tokens=False))
    assert lp["text_offset"][len(ids)] == len(echo)
    # logprobs 0: each position's dict is its own token alone (the prompt's first has none).
    assert lp["top_logprobs"][1:] == [{t: v} for t, v in zip(lp["tokens"][1:], lp["token_logprobs"][1:], strict=True)]


def test_generated_tokens_without_echo(tokenizer: Any) -> None:
    response, streamed = run_completion(tokenizer, "Return the", logprobs=1)
    [choice], [merged] = response["choices"], streamed
    output_ids = tokenizer.encode(GENERATED, add_special_tokens=False)
    assert choice["text"] == merged["text"] == GENERATED
    lp = choice["logprobs"]
    assert lp == merged["logprobs"]
    assert lp["text_offset"] == reference_offsets(tokenizer, output_ids)
    assert lp["token_logprobs"] == [-1.0] * len(output_ids)
    # The engine's top 1 is ` the` at even positions (the sampled token is added) and the sampled
    # token itself at odd ones.
    assert lp["top_logprobs"] == [{" the": -0.5, token: -1.0} if j % 2 == 0 else {token: -1.0}
                                  for j, token in enumerate(lp["tokens"])]
