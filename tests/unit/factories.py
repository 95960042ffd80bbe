"""Small factories for engine unit tests (no torch)."""

from __future__ import annotations

import itertools

from sloth_serve.engine.block_manager import BlockManager
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.engine.scheduler import Scheduler, SchedulerConfig
from sloth_serve.engine.sequence import Sequence

_ids = itertools.count()


def create_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    max_loras: int = 4,
    prefix_caching: bool = True,
    max_prefill_tokens_while_decoding: int = 512,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    cfg = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, max_loras,
                          max_prefill_tokens_while_decoding)
    return Scheduler(cfg, bm)


def create_seq(num_prompt_tokens: int = 10, max_tokens: int = 8, first_token: int = 100,
               adapter_id: int = 0, eos: int = 1, **params: object) -> Sequence:
    tokens = list(range(first_token, first_token + num_prompt_tokens))
    return Sequence(f"req-{next(_ids)}", tokens, SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
                    adapter_id, frozenset({eos}))


def run_step(scheduler: Scheduler, token: int = 7) -> tuple[list[Sequence], list[int]]:
    """One step where every sequence that reaches its end samples `token`."""
    batch = scheduler.schedule()
    seqs, counts = list(batch.seqs), list(batch.num_new_tokens)
    sampled = [token if batch.samples(i) else None for i in range(len(batch.seqs))]
    scheduler.postprocess(batch, sampled)
    return seqs, counts
