"""The end of a choice on the demo tokenizer, driven by a scripted engine: a stop string completed in
the same delivery as the EOS after it ends the choice there (the EOS is neither counted nor listed),
a stop string that begins inside the first min_tokens tokens and ends after them is matched (as
vLLM's look-back does), and text holding a real U+FFFD is sent, not held back for good."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from queued_engine import QueuedEngine
from transformers import AutoTokenizer

from sloth_serve.api.choice_stream import ChoiceRequest, run_choice
from sloth_serve.api.detokenizer import IncrementalDetokenizer
from sloth_serve.api.logprobs import prompt_text_offsets
from sloth_serve.api.stop_strings import StopStringMatcher
from sloth_serve.engine.client import FinishReason, RequestOutput, SamplingParams
from sloth_serve.loader import DEMO_MODEL


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


class Deliveries(QueuedEngine):
    """Each request gets `deliveries` (lists of token ids) as its outputs, the last finished with
    `reason`; an output is queued once the reader took the one before."""

    def __init__(self, deliveries: list[list[int]], reason: FinishReason) -> None:
        super().__init__()
        self.deliveries, self.reason = deliveries, reason

    def _send_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: int,
                  eos_token_ids: frozenset[int] | None, mm: Any, system_prompt_end: int) -> None:
        n = len(self.deliveries)
        outputs = [RequestOutput(request_id, ids, i == n - 1, self.reason if i == n - 1 else None)
                   for i, ids in enumerate(self.deliveries)]
        self.release(request_id, outputs)


def run(tokenizer: Any, deliveries: list[list[int]], reason: FinishReason, stop: tuple[str, ...],
        min_tokens: int = 0) -> tuple[str, list[int], str | None]:
    """The choice's text, token ids and finish reason."""
    async def go() -> tuple[str, list[int], str | None]:
        engine = Deliveries(deliveries, reason)
        req = ChoiceRequest(0, "r-0", [1, 2], SamplingParams(max_tokens=64, min_tokens=min_tokens), stop=stop)
        text, ids, finish = "", [], None
        async for delta in run_choice(engine, tokenizer, req):
            text, ids, finish = text + delta.text, ids + delta.token_ids, delta.finish_reason or finish
        return text, ids, finish

    return asyncio.run(go())


def test_a_stop_string_completed_with_the_eos_in_one_delivery_ends_the_choice_there(tokenizer: Any) -> None:
    ids = tokenizer.encode(" value of item.", add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # Speculative decoding (or a slow reader) delivers the token completing "." and the EOS together.
    text, got, finish = run(tokenizer, [ids[:2], [*ids[2:], eos]], FinishReason.STOP, (".",))
    assert (text, got, finish) == (" value of item", ids, "stop")


def test_a_stop_tokens_text_is_left_out_but_the_token_counts(tokenizer: Any) -> None:
    ids = tokenizer.encode(" value of item", add_special_tokens=False)
    assert run(tokenizer, [ids[:2], ids[2:]], FinishReason.STOP, ()) == (" value of", ids, "stop")


@pytest.mark.parametrize("per_delivery", [1, 2, 5])
def test_a_stop_string_begun_within_min_tokens_and_ended_after_them_is_matched(tokenizer: Any,
                                                                               per_delivery: int) -> None:
    ids = tokenizer.encode(" value of OPTION of item", add_special_tokens=False)
    assert tokenizer.decode(ids[:2]) == " value of"
    deliveries = [ids[i:i + per_delivery] for i in range(0, len(ids), per_delivery)]
    # " value of" ends in token 2: past min_tokens 1, so it counts although it began in token 1.
    text, got, finish = run(tokenizer, deliveries, FinishReason.LENGTH, ("value of",), min_tokens=1)
    assert (text, finish) == (" ", "stop") and got == ids[:2]
    # Ending within the first 2 tokens, it does not count; the next match is after them.
    text, _, finish = run(tokenizer, deliveries, FinishReason.LENGTH, (" of",), min_tokens=2)
    assert (text, finish) == (" value of OPTION", "stop")


def test_the_matcher_holds_a_possible_stop_string_back_through_unchecked_text() -> None:
    stops = StopStringMatcher(["ab", "xaby"])
    assert stops.feed("zxab", check=False) == "z"  # "xab" may begin "xaby": held, but "ab" is in unchecked text
    assert stops.feed("c") == "xabc" and stops.matched is None
    assert stops.feed("xa", check=False) == "" and stops.feed("bq") == "x" and stops.matched == "ab"


def test_text_with_a_real_replacement_character_is_sent(tokenizer: Any) -> None:
    text = "\ufffd" * 40
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    sent = [detok.add([t]) for t in ids]
    # Sent as it comes (at most a character's worth of tokens held), not held to the end.
    assert "".join(sent) + detok.flush() == text
    assert max(len(run_) for run_ in "".join("x" if s else "." for s in sent).split("x")) < 4
    offsets = prompt_text_offsets(tokenizer, ids, text)
    assert offsets == sorted(offsets) and offsets[-1] == len(text) - 1
