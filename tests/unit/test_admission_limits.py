"""Admission's request and prompt-token accounting, request deadlines, and the new limit flags (no
model, no server)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from sloth_serve.api.admission import Admission
from sloth_serve.api.choice_stream import Deadline
from sloth_serve.api.errors import APIError
from sloth_serve.cli import build_parser, config_from_args
from sloth_serve.config import Config


def test_tokens_are_counted_limited_and_released_once() -> None:
    admission = Admission(limit=10, max_tokens=100)
    first = admission.admit()
    first.reserve_tokens(60, "prompt")
    second = admission.admit()
    with pytest.raises(APIError) as info:
        second.reserve_tokens(41, "prompt")
    assert info.value.status_code == 503 and info.value.headers == {"Retry-After": "1"}
    assert "60 prompt tokens in flight" in info.value.message and admission.num_tokens_in_flight == 60
    second.reserve_tokens(40, "prompt")  # exactly the budget
    assert admission.num_tokens_in_flight == 100 and admission.num_in_flight == 2
    for ticket in (first, first, second, second):  # release is idempotent
        ticket.release()
    assert admission.num_tokens_in_flight == 0 and admission.num_in_flight == 0


def test_request_over_the_whole_budget_is_400_naming_the_param() -> None:
    admission = Admission(limit=10, max_tokens=100)
    ticket = admission.admit()
    with pytest.raises(APIError) as info:
        ticket.reserve_tokens(101, "messages")
    assert info.value.status_code == 400 and info.value.param == "messages"
    assert "101" in info.value.message and "100" in info.value.message
    ticket.release()
    assert admission.num_tokens_in_flight == 0 and admission.num_in_flight == 0


def test_without_a_budget_tokens_are_counted_not_limited() -> None:
    admission = Admission(limit=10)
    ticket = admission.admit()
    ticket.reserve_tokens(10**6, "prompt")
    assert admission.num_tokens_in_flight == 10**6
    ticket.release()
    assert admission.num_tokens_in_flight == 0


def test_the_gauge_follows_the_tokens_in_flight() -> None:
    admission, registry = Admission(limit=10, max_tokens=50), CollectorRegistry()
    admission.export(registry)
    ticket = admission.admit()
    ticket.reserve_tokens(30, "prompt")
    assert registry.get_sample_value("sloth:num_prompt_tokens_in_flight") == 30
    ticket.release()
    assert registry.get_sample_value("sloth:num_prompt_tokens_in_flight") == 0
    assert admission.max_tokens == 50


def test_deadline_is_the_shorter_timeout_from_arrival() -> None:
    assert Deadline.of(100.0, None, None) is None
    assert Deadline.of(100.0, 5.0, None) == Deadline(105.0, 5.0)
    assert Deadline.of(100.0, None, 30.0) == Deadline(130.0, 30.0)
    assert Deadline.of(100.0, 60.0, 30.0) == Deadline(130.0, 30.0)  # a request cannot extend the server's
    assert Deadline.of(100.0, 0.5, 30.0) == Deadline(100.5, 0.5)

    async def expired() -> tuple[bool, bool]:
        now = asyncio.get_running_loop().time()
        return Deadline(now - 1, 1).expired, Deadline(now + 60, 60).expired

    assert asyncio.run(expired()) == (True, False)


def test_limit_flags_reach_the_config() -> None:
    parse = build_parser().parse_args
    config = config_from_args(parse(["--max-queued-tokens", "4096", "--request-timeout", "2.5"]))
    assert config.max_queued_tokens == 4096 and config.request_timeout == 2.5
    config = config_from_args(parse(["--max-queued-tokens", "0", "--request-timeout", "0"]))
    assert config.max_queued_tokens == 0 and config.request_timeout is None  # 0: unlimited
    assert Config().max_queued_tokens is None and Config().request_timeout is None  # None: from the KV cache
    for flags in (["--max-queued-tokens", "-1"], ["--request-timeout", "-1"], ["--request-timeout", "nan"],
                  ["--request-timeout", "inf"]):
        with pytest.raises(ValueError):
            config_from_args(parse(flags))
