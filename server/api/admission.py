"""Load shedding: at most `max_queued_requests` generation requests in flight; the next gets a 503
with Retry-After instead of an unbounded wait."""

from __future__ import annotations

from server.api.errors import APIError

RETRY_AFTER_S = 1


class Ticket:
    """One admitted request; `release` is idempotent so every exit path may call it."""

    __slots__ = ("_admission", "_released")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.num_in_flight -= 1


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.num_in_flight = 0

    def admit(self) -> Ticket:
        if self.num_in_flight >= self.limit:
            raise APIError(
                f"the server is at its limit of {self.limit} requests in flight; retry shortly",
                503,
                code="overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.num_in_flight += 1
        return Ticket(self)
