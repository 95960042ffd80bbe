"""The bounds put on a request before its work (no server): the character limit and the tokenizer
facts it rests on, prompts x n against the queue, the derived defaults of --max-queued-tokens and
--max-request-bytes, at most two long prompts tokenized at once, and the connection-timeout flags."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from sloth_serve.api import prompts
from sloth_serve.api.admission import Admission, default_token_budget
from sloth_serve.api.errors import APIError
from sloth_serve.api.limits import (
    MAX_DEFAULT_REQUEST_BYTES,
    default_max_request_bytes,
    fit_limits,
    request_bytes_limit,
)
from sloth_serve.api.prompts import MAX_CHARS_PER_TOKEN, chars_per_token, check_prompt_chars, max_prompt_chars
from sloth_serve.cli import build_parser, config_from_args
from sloth_serve.config import Config
from sloth_serve.loader import DEMO_MODEL


class FakeTokenizer:
    def __init__(self, *vocab: str) -> None:
        self.vocab = {token: i for i, token in enumerate(vocab)}

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


@pytest.fixture(scope="module")
def demo_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


def test_no_text_has_more_characters_a_token_than_the_bound(demo_tokenizer: Any) -> None:
    """What makes the character limit safe: whatever the text, its tokens cover at most
    chars_per_token characters each, so a text over max_model_len x that cannot fit."""
    bound = chars_per_token(demo_tokenizer)
    assert bound == 23  # the demo vocabulary's longest string: a newline and 22 spaces
    texts = [" " * 5000, "\n" + " " * 22, ("\n" + " " * 22) * 200, "=" * 5000, "-" * 5000, "\t" * 5000,
             "HTTPRequestHandler " * 100, "\u00e9t\u00e9 \u4e2d\u6587 \U0001f600" * 100, "a" * 5000]
    for text in texts:
        num_tokens = len(demo_tokenizer.encode(text, add_special_tokens=False))
        assert len(text) <= bound * num_tokens, (text[:30], num_tokens)


def test_the_bound_is_the_longest_vocabulary_string_capped() -> None:
    assert chars_per_token(FakeTokenizer("a", "bcd", "<|special_token|>")) == 17
    assert chars_per_token(FakeTokenizer("a", "x" * 500)) == MAX_CHARS_PER_TOKEN
    assert max_prompt_chars(FakeTokenizer("ab", "abcd"), 100) == 400


def test_a_text_too_long_for_the_context_is_400_naming_the_limit() -> None:
    tokenizer = FakeTokenizer("abcd")  # 4 characters a token at most
    check_prompt_chars(400, tokenizer, 100, "prompt")  # could be 100 tokens: allowed
    with pytest.raises(APIError) as info:
        check_prompt_chars(401, tokenizer, 100, "prompt[2]")
    err = info.value
    assert err.status_code == 400 and err.code == "context_length_exceeded" and err.param == "prompt[2]"
    assert "100 tokens" in err.message and "at most 400 characters" in err.message and "401" in err.message


def test_each_prompt_counts_once_per_choice_against_the_queue() -> None:
    admission = Admission(limit=16)
    with pytest.raises(APIError) as info:
        admission.admit(20, "prompt")  # 4 prompts x n=5: could never be admitted
    assert info.value.status_code == 400 and info.value.code == "too_many_queued_requests"
    assert info.value.param == "prompt" and "20 completions" in info.value.message
    first = admission.admit(10, "prompt")
    with pytest.raises(APIError) as info:
        admission.admit(7, "messages")
    assert info.value.status_code == 503 and info.value.headers == {"Retry-After": "1"}
    second = admission.admit(6, "messages")
    assert admission.num_in_flight == 16
    for ticket in (first, second, first):
        ticket.release()
    assert admission.num_in_flight == 0


def state_of(config: Config) -> SimpleNamespace:
    tokenizer = FakeTokenizer("a" * 10)  # 10 characters a token at most
    info = SimpleNamespace(num_cache_tokens=100 * 16)  # the engine's EngineInfo: 100 blocks of 16 tokens
    runtime = SimpleNamespace(info=info, tokenizer=tokenizer, max_model_len=1000, vision=None)
    return SimpleNamespace(config=config, runtime=runtime,
                           admission=Admission(config.max_queued_requests, config.max_queued_tokens))


def test_queued_tokens_default_to_twice_the_kv_cache_once_it_is_sized() -> None:
    assert default_token_budget(1600) == 3200
    state = state_of(Config())
    assert state.admission.max_tokens is None  # until the model is loaded
    fit_limits(state.config, state.runtime, state.admission)  # type: ignore[arg-type]
    assert state.admission.max_tokens == 2 * 100 * 16
    explicit = state_of(Config(max_queued_tokens=500))
    fit_limits(explicit.config, explicit.runtime, explicit.admission)  # type: ignore[arg-type]
    assert explicit.admission.max_tokens == 500
    unlimited = state_of(Config(max_queued_tokens=0))
    fit_limits(unlimited.config, unlimited.runtime, unlimited.admission)  # type: ignore[arg-type]
    assert unlimited.admission.max_tokens is None


def test_body_limit_defaults_to_what_the_longest_prompt_needs() -> None:
    # 1000 tokens x 10 characters, 4 bytes each at most in UTF-8, plus 1 MiB for the rest.
    assert request_bytes_limit(Config(), state_of(Config()).runtime) == 40_000 + 2**20  # type: ignore[arg-type]
    assert request_bytes_limit(Config(max_request_bytes=5000), state_of(Config()).runtime) == 5000  # type: ignore[arg-type]
    # Before the model is loaded, the cap: a valid request then gets the route's 503, not a 413.
    assert request_bytes_limit(Config(), None) == MAX_DEFAULT_REQUEST_BYTES
    assert default_max_request_bytes(131072 * 32) == MAX_DEFAULT_REQUEST_BYTES == 16 * 2**20


def test_at_most_two_long_prompts_are_tokenized_at_once() -> None:
    running, most = 0, 0
    lock = threading.Lock()

    def slow_encode(text: str) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return len(text)

    async def main() -> list[int]:
        text = "x" * (prompts.LONG_PROMPT_CHARS + 1)
        return await asyncio.gather(*(prompts._off_loop_if_long(len(text), slow_encode, text) for _ in range(8)))

    assert asyncio.run(main()) == [prompts.LONG_PROMPT_CHARS + 1] * 8
    assert most == prompts.MAX_CONCURRENT_LONG_ENCODES == 2


def test_limit_flags_reach_the_config() -> None:
    parse = build_parser().parse_args
    config = config_from_args(parse(["--header-timeout", "3", "--keep-alive-timeout", "2", "--max-request-bytes",
                                     "1000", "--max-queued-tokens", "0"]))
    assert (config.header_timeout, config.keep_alive_timeout, config.max_request_bytes) == (3, 2, 1000)
    assert config.max_queued_tokens == 0  # unlimited
    default = config_from_args(parse([]))
    assert default.max_queued_tokens is None and default.max_request_bytes is None  # derived at load
    for flags in (["--header-timeout", "0"], ["--keep-alive-timeout", "-1"], ["--max-request-bytes", "0"],
                  ["--max-queued-tokens", "-1"], ["--header-timeout", "inf"]):
        with pytest.raises(ValueError):
            config_from_args(parse(flags))
