"""The HTTP front end's CPU cost per streamed token, on any machine (no GPU, no model).

The real front end (server/api under uvicorn, the real ProcessEngineClient, ZeroMQ and the wire
codec) serves streaming chat requests; in place of the engine process a *token source* process
speaks the engine's side of the wire: it answers Ready, takes AddRequest / Abort / Shutdown, and
every `--step-ms` sends one StepOutputs with one token for each running request (at most
`--max-batch`), until each request's max_tokens. The tokens are a real English passage encoded by
the demo model's byte-level BPE tokenizer, so detokenization does real work. A client process keeps
`--streams` requests in flight, one keep-alive connection each (raw HTTP/1.1 through h11, to spend
little CPU of its own).

What is measured is the front end process's CPU time (all its threads: event loop, ZeroMQ I/O,
tokenizer threads) over the measured window, divided by the output tokens the client received:
microseconds of front-end CPU per output token. 1e6 / that is the tokens per second one core
could sustain. The source and the client run in their own processes and are not counted.

    python bench/frontend_cpu.py [--streams 64] [--step-ms 7.6] [--max-tokens 256] [--seconds 20]
    python bench/frontend_cpu.py --profile /tmp/fe.prof   # cProfile of the front end's event loop
    python bench/frontend_cpu.py --api-server-count 2     # two front ends on one port (CPU summed)

--step-ms 7.6 at 64 streams offers ~8,400 tok/s (Phi-4-mini's engine-alone rate on the H200);
--step-ms 0 sends steps as fast as the source can (the front end then runs flat out). Results:
bench/results/frontend-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PASSAGE = (
    "The river runs slowly through the valley in late summer, when the fields on either side turn "
    "gold and the farmers begin the harvest. Children walk along the bank after school, skipping "
    "stones and counting the ripples; old men sit under the willows and talk about the weather, "
    "the price of grain, and the years when the water rose over the road. In the evening the light "
    "lies low across the hills, and the first lamps come on in the windows of the village. "
)


# --- the token source: the engine's side of the wire, without an engine --------------------------


@dataclass
class _Running:
    request_id: str
    max_tokens: int
    num_prompt_tokens: int
    arrival: float
    sent: int = 0


def token_source(commands_addresses: list[str], events_addresses: list[str], parent_pid: int, step_s: float,
                 max_batch: int, tokens_per_step: int) -> None:
    """Child process: Ready, then a step every `step_s`: `tokens_per_step` tokens for each running
    request (the first `max_batch`), each request finished (LENGTH) at its max_tokens. One pair of
    sockets per front end; the engine process's ClientRouter sends each front end its own outputs."""
    import zmq

    from sloth_serve.engine.client_router import ClientRouter
    from sloth_serve.engine.outputs import EngineInfo, RequestOutput, StepStats
    from sloth_serve.engine.sequence import FinishReason
    from sloth_serve.engine.wire import (
        Ready,
        Shutdown,
        StepOutputs,
        command_codec,
        event_codec,
    )
    from sloth_serve.loader import DEMO_MODEL
    from sloth_serve.loader.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO_MODEL)
    text_ids: list[int] = tokenizer.encode(PASSAGE * 4, add_special_tokens=False)
    context = zmq.Context()
    events, commands = [], []
    poller = zmq.Poller()
    for events_address, commands_address in zip(events_addresses, commands_addresses, strict=True):
        events.append(context.socket(zmq.PUSH))
        events[-1].setsockopt(zmq.LINGER, 1000)
        events[-1].connect(events_address)
        commands.append(context.socket(zmq.PULL))
        commands[-1].connect(commands_address)
        poller.register(commands[-1], zmq.POLLIN)
    router = ClientRouter(len(events))
    codec, ccodec = event_codec(), command_codec()

    def send(event: Any) -> None:
        for client, part in router.event(event):
            events[client].send(codec.encode(part), copy=False)

    num_blocks, block_size = 4096, 16
    send(Ready(EngineInfo(str(DEMO_MODEL), None, frozenset({2}), len(tokenizer), 4096, num_blocks, block_size, 0)))
    running: dict[str, _Running] = {}
    next_step = time.monotonic()
    while os.getppid() == parent_pid:
        outputs: list[RequestOutput] = []
        for socket_ready, _ in poller.poll(0):
            client = commands.index(socket_ready)
            while socket_ready.poll(0):
                command, answers = router.command(client, ccodec.decode(socket_ready.recv(copy=False).buffer))
                for to, answer in answers:
                    events[to].send(codec.encode(answer), copy=False)
                if isinstance(command, Shutdown):
                    context.destroy(linger=0)
                    return
                if command is not None:
                    _apply(command, running, outputs)
        now = time.monotonic()
        batch = list(running.values())[:max_batch]
        for r in batch:
            n = min(tokens_per_step, r.max_tokens - r.sent)
            ids = [text_ids[(r.sent + i) % len(text_ids)] for i in range(n)]
            r.sent += n
            done = r.sent >= r.max_tokens
            if done:
                del running[r.request_id]
            outputs.append(RequestOutput(r.request_id, ids, done, FinishReason.LENGTH if done else None,
                                         num_prompt_tokens=r.num_prompt_tokens, num_output_tokens=r.sent,
                                         arrival_time=r.arrival, first_scheduled_time=r.arrival,
                                         first_token_time=r.arrival))
        if outputs:
            stats = StepStats(now, len(running), 0, num_blocks - len(running), num_blocks, len(batch),
                              forward_seconds=step_s)
            send(StepOutputs(outputs, [stats]))
        next_step = max(next_step + step_s, time.monotonic() - step_s)
        left = next_step - time.monotonic()
        if left > 0:
            poller.poll(int(left * 1000))  # wakes early for a command; the next loop sends the step on time
            left = next_step - time.monotonic()
            if left > 0:
                time.sleep(left)


def _apply(command: Any, running: dict[str, _Running], outputs: list[Any]) -> None:
    """An AddRequest or Abort on the source's running requests (an abort's end goes to `outputs`)."""
    from sloth_serve.engine.outputs import RequestOutput
    from sloth_serve.engine.wire import Abort, AddRequest

    if isinstance(command, AddRequest):
        running[command.request_id] = _Running(command.request_id, command.params.max_tokens or 16,
                                               len(command.prompt_token_ids), time.monotonic())
    elif isinstance(command, Abort):
        gone = running.pop(command.request_id, None)
        if gone is not None:
            outputs.append(RequestOutput(gone.request_id, [], True, command.reason,
                                         num_prompt_tokens=gone.num_prompt_tokens,
                                         num_output_tokens=gone.sent, arrival_time=gone.arrival))


def _source_client(config: Any, step_s: float, max_batch: int, tokens_per_step: int) -> Any:
    """The real ProcessEngineClient, spawning the token source instead of the engine process."""
    from sloth_serve.engine.process_client import ProcessEngineClient

    class SourceClient(ProcessEngineClient):
        def spawn(self) -> None:
            if self.process is not None:
                return
            commands, events = f"ipc://{self._dir}/commands", f"ipc://{self._dir}/events"
            self._commands.bind(commands)
            self._events.bind(events)
            self.process = multiprocessing.get_context("spawn").Process(
                target=token_source, name="token-source",
                args=([commands], [events], os.getpid(), step_s, max_batch, tokens_per_step))
            self.process.start()

    return SourceClient(config)


# --- the front end -------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    from sloth_serve.config import Config

    return Config(port=args.port, log_level="warning", access_log=False, max_queued_requests=4 * args.streams,
                  api_server_count=args.api_server_count)


def _uvicorn_server(config: Any, engine: Any, front_end: int = 0) -> Any:
    """The server's own app and uvicorn options, with `engine` as its engine."""
    import uvicorn

    from sloth_serve.api import create_app
    from sloth_serve.api.connections import uvicorn_options
    from sloth_serve.logs import configure_logging

    configure_logging(config.log_level, config.log_format, access_log=False, log_requests=False)
    app = create_app(config, engine, front_end)
    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning",
                                         log_config=None, access_log=False,
                                         **uvicorn_options(config.header_timeout, config.keep_alive_timeout)))


def serve_many(args: argparse.Namespace) -> None:
    """--api-server-count N > 1: as sloth-serve's parent does (server/api_servers.py), one listening
    socket, the source shared by N front-end processes; SIGINT stops them."""
    import signal
    import tempfile

    from sloth_serve.engine.shared_engine import SharedEngine

    count = args.api_server_count
    work = tempfile.mkdtemp(prefix="frontend-cpu-")
    os.mkdir(f"{work}/metrics")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = f"{work}/metrics"  # the front ends' metrics in files, as served
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(2048)
    commands = [f"ipc://{work}/commands-{i}" for i in range(count)]
    events = [f"ipc://{work}/events-{i}" for i in range(count)]
    context = multiprocessing.get_context("spawn")
    source = context.Process(target=token_source, name="token-source", args=(
        commands, events, os.getpid(), args.step_ms / 1000, args.max_batch, args.tokens_per_step))
    source.start()
    front_ends = [context.Process(target=_front_end, args=(args, i, sock, SharedEngine(source.pid or 0, commands[i],
                                                                                        events[i])))
                  for i in range(count)]
    for process in front_ends:
        process.start()

    def stop(sig: int, frame: object) -> None:
        for process in front_ends:
            os.kill(process.pid or 0, signal.SIGINT)

    signal.signal(signal.SIGINT, stop)
    for process in front_ends:
        process.join()
    source.kill()


def _front_end(args: argparse.Namespace, index: int, sock: socket.socket, shared: Any) -> None:
    from sloth_serve.engine.process_client import ProcessEngineClient

    config = _config(args)
    engine = ProcessEngineClient(config, shared)
    engine.spawn()
    _uvicorn_server(config, engine, index).run(sockets=[sock])


def serve(args: argparse.Namespace) -> None:
    """The front end's process: the server's own app and uvicorn options, the source as its engine."""
    if args.api_server_count > 1:
        serve_many(args)
        return
    config = _config(args)
    engine = _source_client(config, args.step_ms / 1000, args.max_batch, args.tokens_per_step)
    engine.spawn()
    server = _uvicorn_server(config, engine)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile(time.thread_time)  # CPU time: a preempted call is not charged
        profiler.enable()
        try:
            server.run()
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    else:
        server.run()


# --- the client ----------------------------------------------------------------------------------


class _Connection:
    """One keep-alive HTTP/1.1 connection (as an HTTP client's pool keeps them), reopened if closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.conn: Any = None

    async def open(self) -> None:
        import h11

        if self.writer is not None:
            self.writer.close()
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.conn = h11.Connection(h11.CLIENT)

    async def stream(self, body: bytes) -> tuple[int, int, float, float]:
        """One streaming request: (completion tokens by its usage chunk, SSE events, loop times of its
        first content event and of its end)."""
        import h11

        if self.conn is None or self.conn.our_state is not h11.IDLE:
            await self.open()
        assert self.reader is not None and self.writer is not None
        conn, loop = self.conn, asyncio.get_running_loop()
        self.writer.write(conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=[
            ("Host", "127.0.0.1"), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]))
            + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        buffer, events, tokens, first = b"", 0, 0, 0.0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self.reader.read(65536))
                continue
            if isinstance(event, h11.Response) and event.status_code != 200:
                raise RuntimeError(f"HTTP {event.status_code}")
            if isinstance(event, h11.Data):
                buffer += event.data
                *lines, buffer = buffer.split(b"\n\n")
                for line in lines:
                    if not line.startswith(b"data: "):
                        continue
                    events += 1
                    if events == 2:  # the first after the role chunk
                        first = loop.time()
                    if b'"usage":{' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                    elif line.startswith(b'data: {"error"'):
                        raise RuntimeError(line.decode())
            if isinstance(event, h11.EndOfMessage):
                conn.start_next_cycle()
                break
            if isinstance(event, h11.ConnectionClosed):
                self.conn = None
                break
        return tokens, events, first, loop.time()


async def _drive(port: int, streams: int, max_tokens: int, seconds: float, warmup: float) -> dict[str, float]:
    """Keeps `streams` requests in flight. Counted in the window: each request's tokens and events in
    proportion to how much of its streaming (first content event to end) fell inside it, the
    requests that started in it, and their time to first token."""
    body = json.dumps({"model": "base", "messages": [{"role": "user", "content": "Tell me about the river."}],
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                       "temperature": 0.0}).encode()
    loop = asyncio.get_running_loop()
    begin = loop.time()
    lo, hi = begin + warmup, begin + warmup + seconds
    totals = {"tokens": 0.0, "events": 0.0, "requests": 0.0, "ttft": 0.0}

    async def worker() -> None:
        connection = _Connection(port)
        while loop.time() < hi:
            started = loop.time()
            tokens, events, first, end = await connection.stream(body)
            span = max(end - first, 1e-9)
            share = max(0.0, min(end, hi) - max(first, lo)) / span
            totals["tokens"] += tokens * share
            totals["events"] += events * share
            if lo <= started < hi:
                totals["requests"] += 1
                totals["ttft"] += first - started

    tasks = [asyncio.create_task(worker()) for _ in range(streams)]
    await asyncio.sleep(warmup)
    print("MARK start", flush=True)
    await asyncio.sleep(seconds)
    print("MARK end", flush=True)
    await asyncio.gather(*tasks)
    return totals


def client(args: argparse.Namespace) -> None:
    totals = asyncio.run(_drive(args.port, args.streams, args.max_tokens, args.seconds, args.warmup))
    print("RESULT " + json.dumps(totals), flush=True)


# --- the run -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    return sum(float(t.user + t.system) for t in (psutil.Process(pid).cpu_times() for pid in pids))


def _front_end_pids(pid: int, port: int, count: int) -> list[int]:
    """The processes serving HTTP: `pid` itself, or with several front ends its children that
    listen on the port (not the token source)."""
    import psutil

    if count == 1:
        return [pid]
    return [c.pid for c in psutil.Process(pid).children()
            if any(n.laddr and n.laddr.port == port and n.status == psutil.CONN_LISTEN for n in c.net_connections("tcp"))]


def _wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the front end exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the front end did not get ready")


def _wait_all_ready(port: int, timeout: float = 180) -> None:
    """Several front ends: /health is 200 on 20 new connections in a row (whichever front end takes each)."""
    import httpx

    deadline, in_a_row = time.monotonic() + timeout, 0
    while in_a_row < 20:
        if time.monotonic() > deadline:
            raise RuntimeError("the front ends did not all get ready")
        ok = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Connection": "close"}, timeout=5).status_code == 200
        in_a_row = in_a_row + 1 if ok else 0
        time.sleep(0.05 if ok else 0.2)


def run(args: argparse.Namespace) -> dict[str, float]:
    port = _free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    shared = ["--port", str(port), "--streams", str(args.streams), "--step-ms", str(args.step_ms),
              "--max-batch", str(args.max_batch), "--tokens-per-step", str(args.tokens_per_step),
              "--max-tokens", str(args.max_tokens), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
              "--api-server-count", str(args.api_server_count)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    front = subprocess.Popen([*me, "--role", "serve", *shared, *(["--profile", args.profile] if args.profile else [])],
                             env=env)
    try:
        _wait_ready(port, front)
        if args.api_server_count > 1:
            _wait_all_ready(port)
        pids = _front_end_pids(front.pid, port, args.api_server_count)
        assert len(pids) == args.api_server_count, pids
        load = subprocess.Popen([*me, "--role", "client", *shared], env=env, stdout=subprocess.PIPE, text=True)
        assert load.stdout is not None
        cpu0 = wall0 = cpu1 = wall1 = 0.0
        result: dict[str, float] = {}
        for line in load.stdout:
            if line.startswith("MARK start"):
                cpu0, wall0 = _cpu_seconds(pids), time.perf_counter()
            elif line.startswith("MARK end"):
                cpu1, wall1 = _cpu_seconds(pids), time.perf_counter()
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        if load.wait() != 0 or not result:
            raise RuntimeError("the client failed")
    finally:
        front.send_signal(2)  # SIGINT: uvicorn stops (and the profile, if any, is written)
        try:
            front.wait(30)
        except subprocess.TimeoutExpired:
            front.kill()
    wall, cpu = wall1 - wall0, cpu1 - cpu0
    tokens = result["tokens"]
    out = {
        "api_server_count": args.api_server_count, "streams": args.streams, "step_ms": args.step_ms, "tokens_per_step": args.tokens_per_step,
        "wall_s": wall, "frontend_cpu_s": cpu, "tokens_counted": tokens, "requests": result["requests"],
        "us_per_token": 1e6 * cpu / tokens if tokens else 0.0,
        "tok_s": tokens / wall if wall else 0.0, "frontend_cores": cpu / wall if wall else 0.0,
        "events_per_token": result["events"] / tokens if tokens else 0.0,
        "mean_ttft_ms": 1e3 * result["ttft"] / result["requests"] if result["requests"] else 0.0,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("run", "serve", "client"), default="run", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, default=64, help="requests kept in flight")
    ap.add_argument("--step-ms", type=float, default=7.6, help="the source's step period (0: flat out)")
    ap.add_argument("--max-batch", type=int, default=64, help="requests given a token per step at most")
    ap.add_argument("--tokens-per-step", type=int, default=1, help="tokens per request and step (>1: spec decode)")
    ap.add_argument("--max-tokens", type=int, default=256, help="output tokens per request")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the window")
    ap.add_argument("--api-server-count", type=int, default=1,
                    help="front-end processes sharing the port and the source (CPU summed over them)")
    ap.add_argument("--profile", default=None, help="write a cProfile (thread CPU time) of the front end's main thread here")
    args = ap.parse_args()
    if args.role == "serve":
        serve(args)
    elif args.role == "client":
        client(args)
    else:
        print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
