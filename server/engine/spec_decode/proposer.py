"""Which sequences speculate in a step, and their draft tokens (n-gram lookup or a draft model).

Speculation is per sequence and per step: a decoding sequence (its last token is the only one left
to compute) proposes up to --num-speculative-tokens tokens, never past max_tokens or max_model_len.
It is off for the whole step when more sequences run than --speculative-max-batch-size (a verify
step of 1 + k tokens each then costs more than the tokens it saves), and for requests whose next
token depends on the tokens before it beyond the model's logits: a grammar (structured output),
repetition / presence / frequency penalties, or a min_tokens not reached yet. Those decode as usual,
in the same batch as the speculating ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.block_manager import BlockManager
from server.engine.sampler import Sampler
from server.engine.sequence import Sequence
from server.engine.spec_decode.draft import DraftRunner
from server.engine.spec_decode.ngram import propose_ngram


@dataclass(frozen=True, slots=True)
class SpecConfig:
    method: str  # "ngram" or "draft"
    num_tokens: int  # k: draft tokens per step
    max_batch_size: int  # running sequences above which no sequence speculates
    ngram_min: int = 1
    ngram_max: int = 4

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"--speculative-method must be ngram or draft; got {self.method!r}")
        if self.num_tokens < 1:
            raise ValueError(f"--num-speculative-tokens must be at least 1; got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= --prompt-lookup-min <= --prompt-lookup-max; got {self.ngram_min}, "
                             f"{self.ngram_max}")


def can_speculate(seq: Sequence) -> bool:
    """Whether the sequence's next tokens can be verified from the target's logits alone."""
    p = seq.params
    return (seq.num_uncomputed_tokens == 1 and not seq.is_finished and p.structured is None
            and not p.has_penalties and seq.num_output_tokens >= p.min_tokens)


class SpecDecoder:
    def __init__(self, config: SpecConfig, block_manager: BlockManager, max_model_len: int,
                 draft: DraftRunner | None = None) -> None:
        if config.method == "draft" and draft is None:
            raise ValueError("--speculative-method draft needs --speculative-model")
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.draft = draft

    def num_tokens_for(self, seq: Sequence) -> int:
        """Draft tokens worth proposing: none past max_tokens (the target adds one token of its own)
        or max_model_len."""
        left = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        return max(min(self.config.num_tokens, left), 0) if can_speculate(seq) else 0

    def propose(self, running: list[Sequence], sampler: Sampler, draft_probs: dict[str, torch.Tensor]) -> None:
        """Set spec_token_ids of the running sequences that speculate this step (cleared for the others)."""
        draft_probs.clear()
        for seq in running:
            seq.spec_token_ids = []
        if len(running) > self.config.max_batch_size:
            return
        if self.draft is None:
            cfg = self.config
            for seq in running:
                k = self.num_tokens_for(seq)
                if k:
                    seq.spec_token_ids = propose_ngram(seq.token_ids, k, cfg.ngram_min, cfg.ngram_max)
            return
        chosen: list[Sequence] = []
        counts: list[int] = []
        for seq in running:
            k = self.num_tokens_for(seq)
            # The draft writes its KV into the sequence's blocks: they must exist before the step is
            # scheduled (no room: this sequence does not speculate; the scheduler may shrink it more).
            if k and self.block_manager.allocate_slots(seq, 1 + k):
                chosen.append(seq)
                counts.append(k)
        self.draft.propose(chosen, counts, sampler, draft_probs)
