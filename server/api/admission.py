"""Load shedding: at most `max_queued_requests` engine requests in flight (each prompt of an API
request once per choice: 20,000 prompts are 20,000, not one) and at most `--max-queued-tokens` prompt
tokens among them; the next gets a 503 with Retry-After instead of an unbounded wait.

Prompt tokens only are counted (not max_tokens): they are what an admitted request costs for sure
(prefill compute and KV blocks), known before it runs. A prompt is counted once per choice, as
each choice is its own engine request. A request that needs more than a whole limit could never
be admitted: that is a 400, not a 503 to retry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from .errors import APIError

RETRY_AFTER_S = 1
MAX_PROMPTS = 1024  # prompts in one /v1/completions request; `n` is capped by the request model
# --max-queued-tokens' default, in KV caches' worth of tokens: a full cache running and about as much
# waiting. More only lengthens the wait of the last admitted request without raising throughput.
QUEUED_TOKENS_PER_KV_TOKEN = 2


def default_token_budget(num_kv_tokens: int) -> int:
    """--max-queued-tokens when not given: QUEUED_TOKENS_PER_KV_TOKEN x the KV cache's tokens."""
    return QUEUED_TOKENS_PER_KV_TOKEN * num_kv_tokens


def overloaded(message: str) -> APIError:
    return APIError(message, 503, code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})


class Ticket:
    """One admitted request; `release` is idempotent so every exit path may call it."""

    __slots__ = ("_admission", "_released", "num_requests", "num_tokens")

    def __init__(self, admission: Admission, num_requests: int) -> None:
        self._admission = admission
        self._released = False
        self.num_requests = num_requests  # engine requests (prompts x n) this request holds
        self.num_tokens = 0  # prompt tokens this request holds of the budget

    def reserve_tokens(self, num_tokens: int, param: str) -> None:
        """Count `num_tokens` prompt tokens against --max-queued-tokens: a 400 naming `param` when
        they alone exceed it, a 503 + Retry-After when the requests in flight leave too little room.
        The ticket still holds its request slot either way: the caller releases it."""
        admission = self._admission
        limit = admission.max_tokens
        if limit is not None:
            if num_tokens > limit:
                raise APIError(
                    f"this request needs {num_tokens} prompt tokens (each prompt counted once per choice) "
                    f"but the server admits at most {limit} in flight (--max-queued-tokens); "
                    "shorten the prompt or ask for fewer choices",
                    400,
                    param=param,
                    code="too_many_queued_tokens",
                )
            if admission.num_tokens_in_flight + num_tokens > limit:
                raise overloaded(
                    f"the server has {admission.num_tokens_in_flight} prompt tokens in flight; this request's "
                    f"{num_tokens} would exceed its limit of {limit} (--max-queued-tokens); retry shortly"
                )
        self.num_tokens += num_tokens
        admission.num_tokens_in_flight += num_tokens

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.num_in_flight -= self.num_requests
            self._admission.num_tokens_in_flight -= self.num_tokens


class Admission:
    def __init__(self, limit: int, max_tokens: int | None = None) -> None:
        self.limit = limit
        self.max_tokens = max_tokens or None  # None: prompt tokens are counted, not limited
        self.num_in_flight = 0
        self.num_tokens_in_flight = 0

    def admit(self, num_requests: int = 1, param: str | None = None) -> Ticket:
        """A ticket for `num_requests` engine requests (an API request's prompts x n): a 400 naming
        `param` when they alone exceed the limit, a 503 + Retry-After when too few slots are free."""
        limit = self.limit
        if num_requests > limit:
            raise APIError(
                f"this request asks for {num_requests} completions (prompts x n) but the server admits at most "
                f"{limit} in flight (--max-queued-requests); send fewer prompts or choices per request",
                400,
                param=param,
                code="too_many_queued_requests",
            )
        if self.num_in_flight + num_requests > limit:
            raise overloaded(
                f"the server has {self.num_in_flight} of its {limit} requests in flight (each prompt counted once "
                f"per choice); this request's {num_requests} would exceed that (--max-queued-requests); retry shortly"
            )
        self.num_in_flight += num_requests
        return Ticket(self, num_requests)

    def export(self, registry: CollectorRegistry, shared: bool = False) -> Gauge:
        """The in-flight prompt tokens as a gauge, read at scrape time; `shared` (several front ends,
        whose values /metrics sums from files): set by the caller instead."""
        gauge = Gauge("sloth:num_prompt_tokens_in_flight",
                      "Prompt tokens of admitted generation requests (--max-queued-tokens).", registry=registry,
                      multiprocess_mode="livesum")
        if not shared:
            gauge.set_function(lambda: self.num_tokens_in_flight)
        return gauge
