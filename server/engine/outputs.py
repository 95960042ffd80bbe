"""What crosses from the engine to its clients: each request's outputs of a step, the step's
`StepStats` (queue lengths, KV usage, batch size) for the metrics and /health, and `EngineInfo` once.
Plain records of ints, floats and strings: they cross a process boundary as they are (wire.py). The
per-step ones are msgspec Structs encoded as arrays (no field names on the wire): a step's 64 outputs
encode and decode several times faster than as dataclasses (bench/results/frontend-cpu.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from ..startup_clock import Phase
from .sequence import FinishReason, TokenLogprob
from .spec_decode.stats import SpecStats

if TYPE_CHECKING:
    from .sequence import Sequence


class RequestOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one step produced for one request: its new tokens (one a step, or more where speculative
    decoding accepted draft tokens) and, when it ended, why. Timestamps are time.monotonic() values.
    gc=False: it holds lists of numbers and records, never itself, so the collector need not track
    the thousands a second that cross."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    new_logprobs: list[TokenLogprob] = []  # msgspec gives each instance its own list
    # On a request's first output when it asked for them: prompt token j + 1's log-probability at j.
    prompt_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    error: str | None = None
    adapter_id: int = 0

    @classmethod
    def of(cls, seq: Sequence, new_token_ids: list[int], new_logprobs: list[TokenLogprob]) -> RequestOutput:
        return cls(
            request_id=seq.request_id,
            new_token_ids=new_token_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_token_id=seq.stop_token_id,
            new_logprobs=new_logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
            adapter_id=seq.adapter_id,
        )


class StepStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """The engine's state after one step, as the metrics and /health report it. Counters that only
    grow (prefix-cache lookups) are running totals, so a lost or merged record loses nothing."""

    time: float  # time.monotonic() at the step's end (one clock for every process of the machine)
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    num_step_tokens: int = 0  # tokens the step computed (0: nothing ran)
    num_preempted: int = 0  # sequences the step preempted for lack of KV blocks
    forward_seconds: float | None = None  # device time of its forward pass, when measured
    num_prefix_queries: int = 0  # running total of prompt tokens looked up in the prefix cache
    num_prefix_hits: int = 0  # running total of those found
    running_adapters: frozenset[int] = frozenset()  # adapter ids with requests running
    waiting_adapters: frozenset[int] = frozenset()
    max_loras: int = 0
    kernel_compiles: int = 0  # running totals of the engine's process (server/engine/stalls.py)
    slow_gc_pauses: int = 0
    gpu_memory_allocated: int = 0  # bytes held by tensors on the engine's GPU (0 on CPU)
    gpu_memory_reserved: int = 0  # bytes its allocator reserved
    num_state_slots_used: int = 0  # per-sequence state slots held (recurrent models)
    spec: SpecStats | None = None  # speculative decoding's running totals, when it is on

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the front end needs to know of the loaded engine, sent once when it is ready."""

    folder: str  # the base model's folder (its tokenizer)
    adapter_folder: str | None  # the adapter folder given as --model, if any
    eos_token_ids: frozenset[int]
    vocab_size: int  # the model's (token ids of the base are in [0, vocab_size))
    max_model_len: int
    num_blocks: int
    block_size: int
    max_lora_rank: int
    # The engine's timed start-up phases (load, conversion, graphs, warmup): the front end's summary
    # line and gauge add those of an engine process to its own.
    startup_phases: tuple[Phase, ...] = ()
    # The model's recurrent state is snapshotted at prefix points: chat requests say where their
    # system prompt ends (server/engine/state_snapshots.py).
    state_snapshots: bool = False

    @property
    def num_cache_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def initial_stats(self, now: float) -> StepStats:
        return StepStats(now, 0, 0, self.num_blocks, self.num_blocks)
