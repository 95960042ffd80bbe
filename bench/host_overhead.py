"""The serving path's host cost, on any machine: the real server (API, engine thread, scheduler,
sampler, metrics) whose model forward is replaced by a stand-in GPU: the forward returns at once
and the wait for the sampled tokens sleeps (GIL-free) until a GPU step's length has passed. What
the clients then see beyond that sleep is host work that did not overlap the "GPU".

    python bench/host_overhead.py --model DIR --step-ms 11 --port 8300 [server flags...] &
    python bench/serve.py --base-url http://127.0.0.1:8300/v1 --max-concurrency 64 ...

With --step-ms 11.85 (the H200's batch-64 decode step on the 8B shape) and 64 streams, TPOT above
11.85 ms is what the host adds. The logits come from the small model's own head on hidden
states drawn at random (so greedy decoding yields varied text).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from sloth_serve import cli
from sloth_serve.engine.model_runner import ModelRunner, StepInputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-ms", type=float, required=True, help="length of the simulated forward pass")
    args, server_args = ap.parse_known_args()
    step_s = args.step_ms / 1000
    torch.set_num_threads(1)  # the stand-in's small CPU ops should not spin threads the host needs

    done_at = [0.0]
    to_host = ModelRunner._to_host
    launch_decode, finish_decode = ModelRunner.launch_decode, ModelRunner.finish_decode
    launched_done: dict[int, float] = {}

    def queued_forward(self: ModelRunner, inputs: StepInputs) -> torch.Tensor:
        # Like a GPU launch: returns at once; the work starts when the previous launch's is done
        # (one stream) and "finishes" step_s later.
        done_at[0] = max(time.perf_counter(), done_at[0]) + step_s
        self._cpu_forward_seconds = step_s
        return torch.randn(inputs.input_ids.shape[0], self.model.config.hidden_size, dtype=self.kv_caches[0][0].dtype)

    def wait_until(t: float) -> None:
        left = t - time.perf_counter()
        if left > 0:
            time.sleep(left)  # lets go of the GIL, as the wait on the GPU does

    def waiting_to_host(self: ModelRunner, tokens: torch.Tensor) -> list[int]:
        wait_until(done_at[0])
        return to_host(self, tokens)

    def timed_launch(self, batch, prev=None, prev_rows=None):  # type: ignore[no-untyped-def]
        # --async-scheduling: each launched step remembers when its stand-in GPU work ends.
        launched = launch_decode(self, batch, prev, prev_rows)
        launched_done[id(launched)] = done_at[0]
        return launched

    def waiting_finish(self, launched):  # type: ignore[no-untyped-def]
        wait_until(launched_done.pop(id(launched), done_at[0]))
        return finish_decode(self, launched)

    ModelRunner._forward = queued_forward  # type: ignore[method-assign]
    ModelRunner._to_host = waiting_to_host  # type: ignore[method-assign]
    ModelRunner.launch_decode = timed_launch  # type: ignore[method-assign]
    ModelRunner.finish_decode = waiting_finish  # type: ignore[method-assign]
    sys.argv = [sys.argv[0], *server_args]
    cli.main()


if __name__ == "__main__":
    main()
