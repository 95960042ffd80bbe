"""Which sequences speculate in a step, and their draft tokens (n-gram lookup or a draft model).

Speculation is per sequence and per step: a decoding sequence (its last token is the only one left
to compute) proposes up to --num-speculative-tokens tokens, never past max_tokens or max_model_len.
It is off for the whole step when more sequences run than --speculative-max-batch-size (a verify
step of 1 + k tokens each then costs more than the tokens it saves), and for requests whose next
token depends on the tokens before it beyond the model's logits and a mask: repetition / presence /
frequency penalties, or a min_tokens not reached yet. Those decode as usual, in the same batch as the
speculating ones. A grammar (structured output) is a mask: its drafts are cut at the first token the
grammar forbids, and the verify step masks each row by the grammar after the drafts before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..block_manager import BlockManager
from ..sampler import Sampler
from ..sequence import Sequence
from .draft import DraftRunner
from .ngram import propose_ngram


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
    return (seq.num_uncomputed_tokens == 1 and not seq.is_finished and not p.has_penalties
            and seq.num_output_tokens >= p.min_tokens)


class SpecDecoder:
    def __init__(self, config: SpecConfig, block_manager: BlockManager, max_model_len: int,
                 draft: DraftRunner | None = None) -> None:
        if config.method == "draft" and draft is None:
            raise ValueError("--speculative-method draft needs --speculative-model")
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.draft = draft
        self._proposed: list[Sequence] = []  # the sequences given drafts at the last proposal

    def num_tokens_for(self, seq: Sequence) -> int:
        """Draft tokens worth proposing: none past max_tokens (the target adds one token of its own)
        or max_model_len."""
        left = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        return max(min(self.config.num_tokens, left), 0) if can_speculate(seq) else 0

    def propose(self, running: list[Sequence], sampler: Sampler, draft_probs: dict[str, torch.Tensor]) -> None:
        """Set spec_token_ids of the running sequences that speculate this step. Above the batch cap
        this returns at once: a step settles its drafts (scheduler.postprocess clears them), so only
        the sequences proposed for last time can hold any, and nothing runs per sequence."""
        for seq in self._proposed:  # drafts no step settled (a sequence preempted or aborted first)
            seq.spec_token_ids = []
        self._proposed = []
        if draft_probs:
            draft_probs.clear()
        if len(running) > self.config.max_batch_size:
            return
        if self.draft is None:
            cfg = self.config
            for seq in running:
                k = self.num_tokens_for(seq)
                if k:
                    seq.spec_token_ids = propose_ngram(seq.token_ids, k, cfg.ngram_min, cfg.ngram_max)
                    self._proposed.append(seq)
        else:
            counts: list[int] = []
            for seq in running:
                k = self.num_tokens_for(seq)
                # The draft writes its KV into the sequence's blocks: they must exist before the step is
                # scheduled (no room: this sequence does not speculate; the scheduler may shrink it more).
                if k and self.block_manager.allocate_slots(seq, 1 + k):
                    self._proposed.append(seq)
                    counts.append(k)
            self.draft.propose(self._proposed, counts, sampler, draft_probs)
        for seq in self._proposed:
            if seq.params.structured is not None:
                self._cut_at_grammar(seq, sampler, seq.request_id in draft_probs)

    @staticmethod
    def _cut_at_grammar(seq: Sequence, sampler: Sampler, drawn_from_q: bool) -> None:
        """Drop the drafts from the first one the sequence's grammar forbids: its verify row would
        reject it whatever the target says (p = 0 under the mask), and the target's own token at that
        row is the one plain decoding gives. A token drawn from a draft model's q stays, as the last
        draft: its rejection draws from norm(max(0, p - q)), which keeps sampled outputs distributed
        as p (drawing from p instead would not); for n-gram drafts (q one-hot on a token p gives 0)
        and greedy requests the two are the same."""
        valid = sampler.matchers.num_valid_drafts(seq, sampler.grammar)
        if valid < len(seq.spec_token_ids):
            del seq.spec_token_ids[valid + 1 if drawn_from_q else valid :]
