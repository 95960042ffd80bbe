"""Raw SSE reading over httpx, to check the framing itself (the openai client hides it)."""

from __future__ import annotations

import json
from typing import Any

import httpx


def read_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a streamed response, in order. Fails on any other non-empty,
    non-comment line (SSE comments, `: ping`, are allowed)."""
    events = []
    for line in response.iter_lines():
        if not line or line.startswith(":"):
            continue
        assert line.startswith("data: "), f"unexpected SSE line {line!r}"
        events.append(line[len("data: ") :])
    return events


def stream(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[str]:
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_events(response)


def chunks(events: list[str]) -> list[dict[str, Any]]:
    """The JSON chunks before the final [DONE] (which must be last and only there)."""
    assert events and events[-1] == "[DONE]", events[-3:]
    assert "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]
