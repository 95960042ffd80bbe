"""Per-sequence state slots for models whose layers keep a fixed-size state (short convolutions,
linear attention, SSMs) beside the paged KV cache.

A slot is an index into the model runner's state tensors, one slot per running sequence, held for
its whole life and released with its KV blocks (finish, abort, preemption). A preempted sequence is
recomputed from its tokens, so its state is rebuilt by the prefill: nothing is copied out. Like the
block manager, this holds no tensors, only ids.
"""

from __future__ import annotations

from .sequence import Sequence


class StateSlots:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"need at least one state slot, got {num_slots}")
        self.num_slots = num_slots
        # Lowest ids first: a small batch touches few rows of the state tensors.
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def can_allocate(self, seq: Sequence) -> bool:
        return seq.state_slot is not None or bool(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give the sequence a slot (it keeps the one it has). Its state starts empty: the model
        runner clears it at the sequence's first computed token."""
        if seq.state_slot is None:
            if not self._free:
                raise RuntimeError("no free state slot (can_allocate was not checked)")
            seq.state_slot = self._free.pop()

    def free(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self._free.append(seq.state_slot)
            seq.state_slot = None
