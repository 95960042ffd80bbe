"""A scripted OpenAI-style SSE server for testing the benchmark client (bench/serve.py): it streams
`max_tokens` one-word chunks, the first after `ttft` seconds and each next one `itl` seconds later,
so the client's measurements can be checked against known delays. It is a test of the client only;
nothing of sloth-serve runs here."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


@dataclass
class Script:
    ttft: float = 0.1
    itl: float = 0.02
    failing_models: tuple[str, ...] = ()  # answered with HTTP 500
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every request body received


def event(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def make_app(script: Script) -> Starlette:
    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake-base", "object": "model"}]})

    async def generate(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        script.bodies.append(body)
        if body["model"] in script.failing_models:
            return JSONResponse({"error": {"message": "scripted failure", "type": "server_error"}}, status_code=500)
        chat = request.url.path.endswith("/chat/completions")
        n = int(body["max_tokens"])
        n_prompt = len(body["prompt"]) if not chat else len(body["messages"][0]["content"].split())

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def stream() -> AsyncIterator[str]:
            if chat:  # role-only first chunk, sent at once: it is not a token
                yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(script.ttft)
            for i in range(n):
                if i:
                    await asyncio.sleep(script.itl)
                yield event({"choices": [choice(" w", None)]})
            yield event({"choices": [choice("", "length")]})  # finish-only last chunk: not a token
            yield event({"choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                                                  "total_tokens": n_prompt + n}})
            yield event("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[
        Route("/v1/models", models),
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
    ])


class FakeServer:
    """uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, script: Script) -> None:
        self.script = script
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        config = uvicorn.Config(make_app(script), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake SSE server did not start in 10 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
