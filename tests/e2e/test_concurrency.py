"""Many streams at once each get exactly their own tokens (the offline engine's greedy output for
the same prompt ids), and a client that hangs up mid-stream has its request aborted and its KV
blocks freed."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from live_server import BASE_MODEL, LiveServer
from openai import AsyncOpenAI

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_MODEL

NAMES = [
    "json.dumps", "json.loads", "os.path.join", "os.listdir", "re.compile", "re.sub", "math.sqrt",
    "math.floor", "time.sleep", "time.time", "shutil.copy", "shutil.rmtree", "glob.glob", "random.choice",
    "random.shuffle", "itertools.chain", "functools.partial", "functools.reduce", "collections.deque",
    "heapq.heappush", "bisect.bisect", "string.capwords", "textwrap.dedent", "copy.deepcopy",
    "pickle.dumps", "base64.b64encode", "hashlib.sha256", "zlib.compress", "socket.socket",
    "threading.Lock", "subprocess.run", "argparse.ArgumentParser",
]  # fmt: skip
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(DEMO_MODEL, num_kv_blocks=512)


async def stream_text(client: AsyncOpenAI, prompt_ids: list[int]) -> tuple[str, int]:
    text, completion_tokens = "", -1
    stream = await client.completions.create(
        model=BASE_MODEL, prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
    return text, completion_tokens


@pytest.mark.parametrize("which", ["server", "ahead_server"])
def test_32_concurrent_streams_each_get_their_own_tokens(which: str, offline: LLM,
                                                          request: pytest.FixtureRequest) -> None:
    server: LiveServer = request.getfixturevalue(which)  # the default engine, and --async-scheduling
    prompts = [offline.encode(f"The `{name}` function") for name in NAMES]
    expected = offline.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))

    async def run_all() -> list[tuple[str, int]]:
        client = AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        async with client:
            return await asyncio.gather(*(stream_text(client, p) for p in prompts))

    results = asyncio.run(run_all())
    assert len({text for text, _ in results}) > 1  # the prompts really differ
    for (text, completion_tokens), want in zip(results, expected, strict=True):
        assert text == want.text
        assert completion_tokens == len(want.token_ids) == MAX_TOKENS


def wait_for_idle(server: LiveServer, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        health = server.health()
        idle = health["num_running"] == 0 and health["num_waiting"] == 0
        if (idle and health["num_free_blocks"] == health["num_blocks"]) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_client_disconnect_aborts_request_and_frees_kv_blocks(server: LiveServer) -> None:
    wait_for_idle(server, 10)
    body = {"model": BASE_MODEL, "prompt": "The json module", "ignore_eos": True, "stream": True,
            "max_tokens": None}  # all the room
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # keep it: a dropped iterator closes the connection
        started, num_tokens = time.monotonic(), 0
        while time.monotonic() - started < 0.5 or num_tokens < 5:
            num_tokens += next(lines).startswith("data:")
        seconds_per_token = (time.monotonic() - started) / num_tokens
        busy = server.health()
        assert busy["num_running"] == 1
        assert busy["kv_cache_usage"] > 0
    hung_up = time.monotonic()
    idle = wait_for_idle(server, 10)
    freed_after = time.monotonic() - hung_up
    assert idle["num_running"] == 0 and idle["num_waiting"] == 0
    assert idle["num_free_blocks"] == idle["num_blocks"]
    assert idle["kv_cache_usage"] == 0
    assert idle["num_requests_in_flight"] == 0
    # Running to max_model_len instead (~2000 tokens) would have taken far longer.
    remaining = 2000 - num_tokens
    assert freed_after < 0.5 * remaining * seconds_per_token, (freed_after, seconds_per_token)


def test_client_giving_up_on_a_non_streaming_request_aborts_it(server: LiveServer) -> None:
    wait_for_idle(server, 10)
    body = {"model": BASE_MODEL, "prompt": "The json module", "ignore_eos": True, "max_tokens": None}  # all the room
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    gave_up = time.monotonic()
    idle = wait_for_idle(server, 10)
    assert idle["num_running"] == 0 and idle["num_free_blocks"] == idle["num_blocks"]
    assert idle["num_requests_in_flight"] == 0
    assert time.monotonic() - gave_up < 5


def test_async_scheduling_server_answers_like_the_default_one(server: LiveServer, ahead_server: LiveServer) -> None:
    """Chat with and without the adapter, stop strings, n > 1, seeded sampling, logprobs and
    penalties (which drop back to synchronous steps), all at once: the same bodies from both."""
    messages = [[{"role": "user", "content": f"What does `{name}` do?"}] for name in NAMES[:8]]
    kinds = [
        dict(model=BASE_MODEL, max_tokens=20, temperature=0),
        dict(model="upper", max_tokens=20, temperature=0),
        dict(model=BASE_MODEL, max_tokens=30, temperature=0, stop=["e"]),
        dict(model=BASE_MODEL, max_tokens=12, temperature=0.8, seed=5, n=2),
        dict(model="upper", max_tokens=12, temperature=0, logprobs=True, top_logprobs=2),
        dict(model=BASE_MODEL, max_tokens=12, temperature=0, frequency_penalty=1.0),
    ]

    async def answers(base_url: str) -> list[list[tuple[str | None, str | None]]]:
        client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        async with client:
            calls = [client.chat.completions.create(messages=m, **k) for m in messages for k in kinds]  # type: ignore[call-overload]
            done = await asyncio.gather(*calls)
        return [[(c.message.content, c.finish_reason) for c in r.choices] for r in done]

    want = asyncio.run(answers(server.base_url))
    got = asyncio.run(answers(ahead_server.base_url))
    assert got == want
    assert any(reason == "stop" for r in want for _, reason in r)
