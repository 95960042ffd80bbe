"""What one engine step's outputs cost to cross from the engine process to the front end, by transport:
ZeroMQ (ipc) + msgpack by msgspec (what server/engine/wire.py uses), a multiprocessing pipe + pickle,
and a multiprocessing pipe + msgspec. CPU only, no model: the messages are the server's own types.

    python bench/engine_transport.py [--steps 2000]

Per batch size (outputs per step): one-way microseconds per step (engine encodes and sends, the front
end receives and decodes, back to back), the front end's share of it (receive + decode: what the
event loop pays), and a round trip of one small command and its reply. Results: bench/results/."""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sloth_serve.engine.outputs import RequestOutput, StepStats
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.engine.wire import AddRequest, StepOutputs, command_codec, event_codec


def step(batch: int, i: int) -> StepOutputs:
    outs = [RequestOutput(f"chatcmpl-{r:032x}-0", [1000 + i], False, None, num_prompt_tokens=64,
                          num_output_tokens=i, arrival_time=1.0, first_scheduled_time=1.1, first_token_time=1.2)
            for r in range(batch)]
    return StepOutputs(outs, [StepStats(time.monotonic(), batch, 0, 900, 1000, batch, 0, 0.004)])


def command() -> AddRequest:
    return AddRequest("cmpl-abc-0", list(range(64)), SamplingParams(max_tokens=128, temperature=0), 0, None)


# --- the engine side (a child process) -------------------------------------------------------------

def engine_zmq(address: str, reply_address: str, batch: int, steps: int) -> None:
    import zmq

    context = zmq.Context()
    out = context.socket(zmq.PUSH)
    out.connect(address)
    commands = context.socket(zmq.PULL)
    commands.connect(reply_address)
    codec = event_codec()
    for i in range(steps):
        out.send(codec.encode(step(batch, i)), copy=False)
    ccodec = command_codec()
    for _ in range(steps // 4):  # ping-pong: a command in, a reply out
        ccodec.decode(commands.recv())
        out.send(codec.encode(StepOutputs([])), copy=False)
    out.close(linger=5000)
    commands.close()
    context.term()


def engine_pipe(conn: Any, batch: int, steps: int, use_msgspec: bool) -> None:
    codec = event_codec()
    for i in range(steps):
        if use_msgspec:
            conn.send_bytes(codec.encode(step(batch, i)))
        else:
            conn.send(step(batch, i))
    for _ in range(steps // 4):
        conn.recv_bytes()
        conn.send_bytes(b"ok")


# --- the front end's side ------------------------------------------------------------------------

def measure_zmq(batch: int, steps: int) -> tuple[float, float, float]:
    import zmq

    folder = tempfile.mkdtemp(prefix="bench-transport-")
    address, reply_address = f"ipc://{folder}/events", f"ipc://{folder}/commands"
    context = zmq.Context()
    events = context.socket(zmq.PULL)
    events.bind(address)
    commands = context.socket(zmq.PUSH)
    commands.bind(reply_address)
    child = multiprocessing.get_context("spawn").Process(target=engine_zmq, args=(address, reply_address, batch, steps))
    child.start()
    codec, ccodec = event_codec(), command_codec()
    codec.decode(events.recv(copy=False).buffer)  # the child is up
    start, receive = time.perf_counter(), 0.0
    for _ in range(steps - 1):
        t = time.perf_counter()
        codec.decode(events.recv(copy=False).buffer)
        receive += time.perf_counter() - t
    one_way = (time.perf_counter() - start) / (steps - 1)
    trips = []
    for _ in range(steps // 4):
        t = time.perf_counter()
        commands.send(ccodec.encode(command()))
        codec.decode(events.recv(copy=False).buffer)
        trips.append(time.perf_counter() - t)
    child.join()
    context.destroy(linger=0)
    return one_way, receive / (steps - 1), statistics.median(trips)


def measure_pipe(batch: int, steps: int, use_msgspec: bool) -> tuple[float, float, float]:
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(target=engine_pipe, args=(theirs, batch, steps, use_msgspec))
    child.start()
    codec = event_codec()

    def receive_one() -> None:
        codec.decode(ours.recv_bytes()) if use_msgspec else ours.recv()

    receive_one()
    start, receive = time.perf_counter(), 0.0
    for _ in range(steps - 1):
        t = time.perf_counter()
        receive_one()
        receive += time.perf_counter() - t
    one_way = (time.perf_counter() - start) / (steps - 1)
    trips = []
    for _ in range(steps // 4):
        t = time.perf_counter()
        ours.send_bytes(pickle.dumps(command()) if not use_msgspec else command_codec().encode(command()))
        ours.recv_bytes()
        trips.append(time.perf_counter() - t)
    child.join()
    return one_way, receive / (steps - 1), statistics.median(trips)


def codec_costs(batch: int, repeat: int = 500) -> tuple[float, float, float, float]:
    """Microseconds to encode and decode one step's outputs in this process: msgspec, then pickle."""
    message, codec = step(batch, 1), event_codec()
    data, pickled = codec.encode(message), pickle.dumps(message)
    timings = []
    for fn in (lambda: codec.encode(message), lambda: codec.decode(data), lambda: pickle.dumps(message),
               lambda: pickle.loads(pickled)):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        timings.append((time.perf_counter() - t) / repeat * 1e6)
    return timings[0], timings[1], timings[2], timings[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batches", default="1,8,64")
    args = parser.parse_args()
    print(f"{'outputs':>7} {'bytes':>7} {'msgspec enc/dec us':>19} {'pickle enc/dec us':>18}")
    for batch in map(int, args.batches.split(",")):
        enc, dec, penc, pdec = codec_costs(batch)
        print(f"{batch:>7} {len(event_codec().encode(step(batch, 1))):>7} {enc:>9.1f}/{dec:<9.1f} {penc:>8.1f}/{pdec:<9.1f}")
    print(f"{'transport':<22} {'outputs':>7} {'bytes':>7} {'one-way us':>10} {'front end us':>12} {'round trip us':>13}")
    for batch in map(int, args.batches.split(",")):
        size = len(event_codec().encode(step(batch, 1)))
        for name, run in (("zmq + msgspec", lambda b: measure_zmq(b, args.steps)),
                          ("pipe + pickle", lambda b: measure_pipe(b, args.steps, False)),
                          ("pipe + msgspec", lambda b: measure_pipe(b, args.steps, True))):
            one_way, front, trip = run(batch)
            print(f"{name:<22} {batch:>7} {size:>7} {one_way * 1e6:>10.1f} {front * 1e6:>12.1f} {trip * 1e6:>13.1f}")


if __name__ == "__main__":
    main()
