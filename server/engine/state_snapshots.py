"""Prefix caching for models with recurrent layers: copies of a sequence's state taken where its
prompt's last full KV block ends, kept under that block's hash, so that a later prompt with the same
prefix restores the state together with the cached KV blocks (exactly what recomputing would give).
Two more points: the last full block at or below where the front end says the system prompt ends
(`Sequence.system_prompt_end`: a chat's first request already leaves a snapshot there, so the second
with that system prompt and another user turn hits), and where the prompt's KV blocks found in the
cache end when no snapshot is kept there (`Sequence.shared_prefix_end`: a shared prefix nobody
announced, snapshotted by the second prompt that shares it, so that every later one restores it).

Snapshots live in rows of the model's state tensors after the running slots and the scratch row,
reused least recently used first. This holds ids only: the copies to make (source row, destination
row) wait in `pending` until the engine hands them to the model runner, before the next forward."""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class StateSnapshots:
    def __init__(self, first_row: int, num_rows: int, block_size: int) -> None:
        if num_rows < 1:
            raise ValueError(f"need at least one snapshot row, got {num_rows}")
        self.block_size = block_size
        self.free_rows = list(range(first_row + num_rows - 1, first_row - 1, -1))
        self.by_hash: OrderedDict[int, int] = OrderedDict()  # block hash -> row, least recently used first
        self.pending: list[tuple[int, int]] = []  # (source row, destination row), in order

    def boundary(self, seq: Sequence) -> int:
        """Where the sequence's snapshot is taken: the end of its prompt's last full block that a later
        prompt can hit (the last token always runs, as in BlockManager.find_cached_blocks); 0: none."""
        return (seq.num_prompt_tokens - 1) // self.block_size * self.block_size

    def points(self, seq: Sequence) -> list[int]:
        """Every point where the sequence's state is snapshotted, in increasing order (none: empty)."""
        end = self.boundary(seq)
        system = seq.system_prompt_end // self.block_size * self.block_size
        return sorted({p for p in (system, seq.shared_prefix_end) if 0 < p < end} | ({end} if end else set()))

    def cap(self, seq: Sequence, start: int, num_new: int) -> int:
        """A prompt chunk ends at a snapshot point when it would cross it, so the state there can be copied."""
        for end in self.points(seq):
            if start < end < start + num_new:
                return end - start
        return num_new

    def row_of(self, block_hash: int) -> int | None:
        row = self.by_hash.get(block_hash)
        if row is not None:
            self.by_hash.move_to_end(block_hash)
        return row

    def take(self, block_hash: int, slot: int) -> None:
        """Copy the state of `slot` (which has just computed up to the block of `block_hash`)."""
        if block_hash in self.by_hash:
            return
        if self.free_rows:
            row = self.free_rows.pop()
        else:
            _, row = self.by_hash.popitem(last=False)
        self.by_hash[block_hash] = row
        self.pending.append((slot, row))

    def restore(self, block_hash: int, slot: int) -> bool:
        """Queue the copy of the snapshot of `block_hash` into `slot`; False when there is none."""
        row = self.row_of(block_hash)
        if row is None:
            return False
        self.pending.append((row, slot))
        return True

    def drain(self) -> list[tuple[int, int]]:
        copies, self.pending = self.pending, []
        return copies
