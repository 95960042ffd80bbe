"""One request inside the engine: its tokens, KV block table, progress and finish state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

import msgspec

from .mm_inputs import MultiModalInputs
from .sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(StrEnum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # client went away or asked to stop
    ERROR = "error"  # the engine failed while running it


class TokenLogprob(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Log-probability of the sampled token and of the top alternatives at one position (a Struct
    encoded as an array: outputs carry one per token, wire.py)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None  # 1 + how many tokens were more likely (set for prompt tokens)


@dataclass(slots=True, eq=False)
class Sequence:
    """A request's state. `num_computed_tokens` alone says how far it is: there is no prefill/decode
    phase; a sequence whose computed tokens reach its length samples a new token."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    adapter_id: int = 0  # 0 = base model; adapters are numbered from 1
    eos_token_ids: frozenset[int] = frozenset()
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash of each full, computed block
    state_slot: int | None = None  # models with recurrent layers: its row of the state cache
    # ... and where the prompt's KV blocks already cached end, when no state snapshot is kept there
    # (a shared system prompt): a second snapshot point (server/engine/state_snapshots.py).
    shared_prefix_end: int = 0
    # ... and where the front end says the prompt's system part ends (a chat's first user turn starts):
    # snapshotted on the first request already, so the next one with that system prompt hits (0: none).
    system_prompt_end: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # With params.prompt_logprobs: entry j is prompt token j + 1's (the first token has none),
    # filled chunk by chunk in the prefill.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    # Speculative decoding (server/engine/spec_decode): draft tokens proposed after token_ids, which
    # the next step computes with the last token and verifies; the runner sets how many it accepted
    # and the target's logprobs of those accepted. Positions whose draft-model KV is computed.
    spec_token_ids: list[int] = field(default_factory=list)
    num_spec_accepted: int = 0
    spec_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_draft_computed: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    mm: MultiModalInputs | None = None  # the prompt's images (image-text models)
    # Models whose images enter through cross-attention layers (Llama 3.2 Vision): the model runner's
    # keys and values of the images (sloth_serve.engine.cross_inputs.CrossKV, opaque here), computed
    # once, and the bytes reserved for them (sloth_serve.engine.cross_kv); both go with the KV blocks.
    cross_kv: Any = None
    cross_kv_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a request needs at least one prompt token")
        self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
