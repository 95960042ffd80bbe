"""A verify step as a decode step: each of a sequence's 1 + k verified positions is a row of its own.

Row j of a sequence verifying k draft tokens attends to the cache up to its own position (seq_len =
position + 1), and every layer writes the step's keys and values before attending, so the rows
together compute exactly the causal attention of the 1 + k tokens. The step then has the shape of a
decode step of more rows, and replays a decode CUDA graph instead of running eagerly (an eager 8B
step is bound by the host's kernel launches: about 20 ms against under 5 ms replayed, on an H200).
"""

from __future__ import annotations

from .scheduler import ScheduledBatch
from .sequence import Sequence


def decode_rows(batch: ScheduledBatch, ahead: bool = False) -> list[tuple[Sequence, int]] | None:
    """(sequence, position) of each row when every sequence computes one token, or its last token
    and its draft tokens; None otherwise (prompt chunks run eagerly). `ahead`: async scheduling's
    step, one row per sequence at the position after its host-side tokens."""
    if all(n == 1 for n in batch.num_new_tokens):  # a plain decode step (nobody verifies drafts): a row each
        return [(seq, seq.num_tokens if ahead else seq.num_computed_tokens) for seq in batch.seqs]
    if ahead:
        return None
    rows: list[tuple[Sequence, int]] = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        if n != 1 and not (seq.spec_token_ids and n == 1 + len(seq.spec_token_ids)):
            return None
        start = seq.num_computed_tokens
        rows += [(seq, p) for p in range(start, start + n)]
    return rows


def token_at(seq: Sequence, position: int) -> int:
    """The token at a position of the sequence, its draft tokens following its tokens."""
    return seq.token_ids[position] if position < seq.num_tokens else seq.spec_token_ids[position - seq.num_tokens]
