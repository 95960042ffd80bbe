"""--api-server-count 2: two front-end processes on one port, sharing one engine process. Streams run
on both at once with the greedy tokens of one front end, /metrics sums both front ends whichever
answers the scrape (the engine's figures counted once), SIGTERM drains both front ends' streams and
the server exits 0, a --lora-dir adapter is loaded by each front end on its first request there and
answers alike through both, an adapter loaded or unloaded through one front end's
/v1/load_lora_adapter is served or dropped by both, a SIGKILL of the engine ends both front ends' streams with an error event and
the server exits non-zero, and so does a SIGKILL of one front end (the other drains its streams);
none leaves a process behind."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from live_server import BASE_MODEL, LiveServer, launch
from prometheus_client.parser import text_string_to_metric_families

from sloth_serve.loader import DEMO_ADAPTER

EXIT_WITHIN_S = 20  # generous for a busy 2-core CI machine
PROMPTS = [f"Count the {word}" for word in ("apples", "rivers", "stars", "clouds", "hills", "roads", "doors", "birds")]


@pytest.fixture(scope="module")
def all_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    """Two front ends ("two", "drain" for the SIGTERM test and "lose" for the front end killed alone)
    and one ("one"), started together so their loads overlap. "two" and "one" serve the demo's upper-case adapter as "upper" (--lora:
    each front end registers it); "drain" serves a --lora-dir holding it as "shout" and loads adapters
    through /v1/load_lora_adapter."""
    tmp = tmp_path_factory.mktemp("api-servers")
    shutil.copytree(DEMO_ADAPTER, tmp / "adapters" / "shout")
    started = {"two": launch(tmp, "two", "--api-server-count", "2"), "one": launch(tmp, "one"),
               "drain": launch(tmp, "drain", "--api-server-count", "2", "--shutdown-timeout", "60",
                               "--lora-dir", str(tmp / "adapters"), "--allow-runtime-lora", demo_adapter=False),
               "lose": launch(tmp, "lose", "--api-server-count", "2", demo_adapter=False)}
    try:
        for name, server in started.items():
            server.wait_ready()
            # /health answered by one front end: wait for the other's 200 too.
            for _ in range(0 if name == "one" else 20):
                assert httpx.get(f"{server.url}/health", headers={"Connection": "close"}, timeout=10).status_code == 200
        yield started
    finally:
        for server in started.values():
            if server.process.poll() is None:
                server.stop()


@pytest.fixture(scope="module")
def servers(all_servers: dict[str, LiveServer]) -> tuple[LiveServer, LiveServer]:
    """(the two front ends, one front end)."""
    return all_servers["two"], all_servers["one"]


def front_ends(server: LiveServer) -> dict[int, psutil.Process]:
    """The server's front-end processes by pid: its children holding the listening socket's port."""
    port = int(server.url.rsplit(":", 1)[1])
    found = {}
    for child in psutil.Process(server.process.pid).children():
        if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")):
            found[child.pid] = child
    return found


def engine_of(server: LiveServer) -> psutil.Process:
    """The child started by multiprocessing's spawn that is not a front end (not its resource tracker)."""
    serving = front_ends(server)
    [engine] = [c for c in psutil.Process(server.process.pid).children()
                if c.pid not in serving and any("spawn_main" in word for word in c.cmdline())]
    return engine


def serving_pids(server: LiveServer) -> set[int]:
    """Front ends holding an open client connection now."""
    port = int(server.url.rsplit(":", 1)[1])
    return {pid for pid, p in front_ends(server).items()
            if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                   for c in p.net_connections("tcp"))}


class Streams:
    """Streaming completions through the official client, one thread each, held open."""

    def __init__(self, server: LiveServer, prompts: list[str], max_tokens: int, model: str = BASE_MODEL) -> None:
        self.model = model
        self.texts: dict[str, list[str]] = {p: [] for p in prompts}
        self.finish_reasons: dict[str, str | None] = dict.fromkeys(prompts)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._read, args=(server, p, max_tokens)) for p in prompts]
        for thread in self.threads:
            thread.start()
            time.sleep(0.05)  # one connection at a time: each accept() goes to whichever front end takes it

    def _read(self, server: LiveServer, prompt: str, max_tokens: int) -> None:
        try:
            # A client each: its own connection (the official client keeps one pool per client).
            stream = server.client(timeout=120).completions.create(
                model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            for chunk in stream:
                if chunk.choices:
                    self.texts[prompt].append(chunk.choices[0].text)
                    self.finish_reasons[prompt] = chunk.choices[0].finish_reason or self.finish_reasons[prompt]
        except BaseException as exc:  # recorded for the test to show
            self.errors.append(exc)

    def wait_started(self) -> None:
        deadline = time.monotonic() + 60
        while any(len(t) < 2 for t in self.texts.values()) and time.monotonic() < deadline and not self.errors:
            time.sleep(0.02)
        assert not self.errors and all(len(t) >= 2 for t in self.texts.values()), self.errors

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=120)


def stream_on_both_front_ends(server: LiveServer, prompts: list[str], max_tokens: int,
                              model: str = BASE_MODEL) -> dict[str, str]:
    """Each prompt's streamed text, all streams open at once, some of them on each front end."""
    streams = Streams(server, prompts, max_tokens, model)
    streams.wait_started()
    on_both = serving_pids(server)
    streams.join()
    assert not streams.errors, streams.errors
    assert len(on_both) == 2, f"every stream went to one front end: {on_both}"
    return {prompt: "".join(pieces) for prompt, pieces in streams.texts.items()}


def greedy(server: LiveServer, prompt: str, max_tokens: int, model: str = BASE_MODEL) -> str:
    reply = server.client().completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, extra_body={"ignore_eos": True})
    return reply.choices[0].text


def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{server.url}/metrics", headers={"Connection": "close"}, timeout=10)
    assert response.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_streams_run_on_both_front_ends_at_once_with_one_front_ends_tokens(
        servers: tuple[LiveServer, LiveServer]) -> None:
    two, one = servers
    assert len(front_ends(two)) == 2
    for prompt, text in stream_on_both_front_ends(two, PROMPTS, 300).items():
        assert text == greedy(one, prompt, 300), prompt


def test_a_lora_adapter_serves_alike_through_every_front_end(servers: tuple[LiveServer, LiveServer]) -> None:
    """Each front end registers the --lora adapter under the same id; the engine holds it once."""
    two, one = servers
    prompt = "Tell me about the river"
    expected = one.client().completions.create(model="upper", prompt=prompt, max_tokens=16, temperature=0)
    assert expected.choices[0].text.upper() == expected.choices[0].text
    for _ in range(6):  # a new connection each, taken by either front end
        reply = two.client().completions.create(model="upper", prompt=prompt, max_tokens=16, temperature=0)
        assert reply.choices[0].text == expected.choices[0].text
    models = httpx.get(f"{two.base_url}/models", headers={"Connection": "close"}, timeout=10).json()
    assert {m["id"] for m in models["data"]} == {BASE_MODEL, "upper"}


def test_a_lora_dir_adapter_is_loaded_by_each_front_end_and_answers_alike(
        all_servers: dict[str, LiveServer]) -> None:
    """Streams naming a --lora-dir adapter on both front ends at once: each front end loads it on its
    first request there (under an id of its own range), and every stream gives the tokens one front
    end with the same folder as --lora gives."""
    two_dir, one = all_servers["drain"], all_servers["one"]
    for prompt, text in stream_on_both_front_ends(two_dir, PROMPTS[:6], 40, model="shout").items():
        assert text == greedy(one, prompt, 40, model="upper") and text.upper() == text, prompt


def models_everywhere(server: LiveServer) -> set[str]:
    """The model ids both front ends list, once they agree: eight answers in a row alike, each on a
    new connection (taken by either front end), within 20 s of what one of them was told."""
    deadline, seen = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        models = httpx.get(f"{server.base_url}/models", headers={"Connection": "close"}, timeout=10).json()
        seen = [*seen[-7:], frozenset(m["id"] for m in models["data"])]
        if len(seen) == 8 and len(set(seen)) == 1:
            return set(seen[0])
        time.sleep(0.05)
    raise AssertionError(f"the front ends list different models: {seen}")


def test_an_adapter_loaded_through_one_front_end_is_served_and_unloaded_by_both(
        all_servers: dict[str, LiveServer]) -> None:
    two_dir, one = all_servers["drain"], all_servers["one"]
    args = psutil.Process(two_dir.process.pid).cmdline()
    body = {"lora_name": "loud", "lora_path": str(Path(args[args.index("--lora-dir") + 1]) / "shout")}
    load = httpx.post(f"{two_dir.base_url}/load_lora_adapter", json=body, headers={"Connection": "close"}, timeout=60)
    assert load.status_code == 200, load.text
    assert "loud" in models_everywhere(two_dir)
    for prompt, text in stream_on_both_front_ends(two_dir, PROMPTS[:6], 24, model="loud").items():
        assert text == greedy(one, prompt, 24, model="upper"), prompt
    # The name is taken on both front ends: a second load under it is refused, whichever answers.
    for _ in range(4):
        again = httpx.post(f"{two_dir.base_url}/load_lora_adapter", json=body, headers={"Connection": "close"},
                           timeout=60)
        assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    unload = httpx.post(f"{two_dir.base_url}/unload_lora_adapter", json={"lora_name": "loud"},
                        headers={"Connection": "close"}, timeout=60)
    assert unload.status_code == 200, unload.text
    assert "loud" not in models_everywhere(two_dir)
    for _ in range(6):
        gone = httpx.post(f"{two_dir.base_url}/completions", json={"model": "loud", "prompt": "Hi", "max_tokens": 2},
                          headers={"Connection": "close"}, timeout=60)
        assert gone.status_code == 404, gone.text


def test_metrics_sum_the_front_ends_and_count_engine_steps_once(servers: tuple[LiveServer, LiveServer]) -> None:
    two, _ = servers
    before = scrape(two)
    replies = [two.client().completions.create(model=BASE_MODEL, prompt=p, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True}) for p in PROMPTS]
    time.sleep(1.5)  # each front end writes its gauges at least once a second
    scrapes = [scrape(two) for _ in range(6)]  # a new connection each: both front ends answer some

    def delta(samples: dict, name: str) -> float:
        return total(samples, name) - total(before, name)

    prompt_tokens = sum(r.usage.prompt_tokens for r in replies)
    for samples in scrapes:
        assert delta(samples, "vllm:request_success_total") == len(PROMPTS)
        assert delta(samples, "vllm:generation_tokens_total") == 12 * len(PROMPTS)
        assert delta(samples, "vllm:prompt_tokens_total") == prompt_tokens
        assert delta(samples, "vllm:e2e_request_latency_seconds_count") == len(PROMPTS)
        # Every front end sees every step: counted twice, the tokens computed would exceed those the
        # requests hold (a prompt's tokens once, each output token but the last once).
        computed = delta(samples, "vllm:iteration_tokens_total_sum")
        assert 0 < computed <= prompt_tokens + 11 * len(PROMPTS)
        assert total(samples, "vllm:num_requests_running") == 0
        assert total(samples, "sloth:num_requests_in_flight") == 0
        assert total(samples, "sloth:max_queued_requests") == 2 * 1024  # each front end's limit, summed
        assert samples[("sloth:server_status", (("status", "ok"),))] == 1
        assert {n for n, _ in samples} >= {"vllm:kv_cache_usage_perc", "vllm:lora_requests_info",
                                           "sloth:http_requests_total", "sloth:startup_seconds"}


def test_killed_engine_ends_both_front_ends_streams_and_the_server_exits_nonzero(
        servers: tuple[LiveServer, LiveServer]) -> None:
    two, _ = servers
    engine = engine_of(two)
    children = [*front_ends(two).values(), engine]
    streams = Streams(two, PROMPTS, 1900)
    streams.wait_started()
    assert len(serving_pids(two)) == 2
    engine.kill()
    killed_at = time.monotonic()
    streams.join()
    # The official client raises on an error event: every stream, on both front ends, ended with one.
    assert len(streams.errors) == len(PROMPTS), streams.errors
    assert all("engine process exited unexpectedly" in str(e) for e in streams.errors), streams.errors
    assert two.process.wait(timeout=EXIT_WITHIN_S) == 1
    assert time.monotonic() - killed_at < EXIT_WITHIN_S
    assert not any(p.is_running() for p in children)
    assert "killed by SIGKILL" in Path(two.log_path).read_text()


def test_sigterm_drains_both_front_ends_streams_and_the_server_exits_zero(
        all_servers: dict[str, LiveServer]) -> None:
    server = all_servers["drain"]
    children = [*front_ends(server).values(), engine_of(server)]
    streams = Streams(server, PROMPTS, 200)
    streams.wait_started()
    assert len(serving_pids(server)) == 2
    server.process.terminate()
    streams.join()
    assert not streams.errors, streams.errors
    # Every stream, on both front ends, ran to its end rather than being cut.
    assert set(streams.finish_reasons.values()) == {"length"}, streams.finish_reasons
    assert server.process.wait(timeout=EXIT_WITHIN_S) == 0
    assert not any(p.is_running() for p in children)


def test_a_killed_front_end_stops_the_other_and_the_engine_and_the_server_exits_nonzero(
        all_servers: dict[str, LiveServer]) -> None:
    """Streams on both front ends; SIGKILL one: its streams break, the parent names it in the log and
    stops the other (SIGTERM: its streams drain to their end) and the engine, and exits 1."""
    server = all_servers["lose"]
    serving = front_ends(server)
    children = [*serving.values(), engine_of(server)]
    streams = Streams(server, PROMPTS, 200)
    streams.wait_started()
    port = int(server.url.rsplit(":", 1)[1])
    # Each stream's connection, by front end: the killed one's streams are the ones that break.
    open_streams = {pid: sum(c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                             for c in p.net_connections("tcp")) for pid, p in serving.items()}
    assert all(open_streams.values()), open_streams
    killed = min(serving)
    serving[killed].kill()
    assert server.process.wait(timeout=EXIT_WITHIN_S) == 1
    streams.join()
    assert not any(p.is_running() for p in children)
    assert len(streams.errors) == open_streams[killed], streams.errors
    assert list(streams.finish_reasons.values()).count("length") == len(PROMPTS) - open_streams[killed]
    assert f"(pid {killed}) was killed by SIGKILL; stopping the others" in Path(server.log_path).read_text()
