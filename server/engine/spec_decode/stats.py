"""Running totals of speculative decoding (no torch): what was proposed and what the target accepted,
in total and per draft position. /metrics exports them under vLLM's spec_decode names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SpecStats:
    enabled: bool = False  # the engine speculates (set at start-up): /metrics exports these then
    num_drafts: int = 0  # verify steps of a sequence with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Entry j: drafts whose token j was accepted (so entry 0 / num_drafts is the first token's rate).
    accepted_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        if num_draft_tokens <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft_tokens:
            self.accepted_per_pos.extend([0] * (num_draft_tokens - len(self.accepted_per_pos)))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step: the accepted drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0
