"""Per-step metadata of the layers that keep a per-sequence state (short convolutions, linear
attention, SSMs): where each sequence's tokens are in the flat batch and which state row it owns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class StateBatch:
    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b's tokens are rows [qsl[b], qsl[b + 1])
    slots: torch.Tensor  # [B] int64: its row of the state tensors
    has_initial: torch.Tensor  # [B] bool: it continues from its state (False: from zeros, a new prompt)
    token_seq: torch.Tensor  # [T] int32: the sequence of each token row
    query_start_loc_host: list[int]
    slots_host: list[int]
    has_initial_host: list[bool]

    @classmethod
    def build(cls, query_start_loc: list[int], slots: list[int], has_initial: list[bool],
              device: torch.device) -> StateBatch:
        token_seq = [b for b in range(len(slots)) for _ in range(query_start_loc[b + 1] - query_start_loc[b])]
        # One upload for the four (a host-to-device copy costs more than its bytes).
        flat = torch.tensor(query_start_loc + slots + [int(h) for h in has_initial] + token_seq, dtype=torch.long)
        flat = flat.to(device, non_blocking=True)
        b = len(slots)
        return cls(flat[: b + 1].int(), flat[b + 1 : 2 * b + 1], flat[2 * b + 1 : 3 * b + 1].bool(),
                   flat[3 * b + 1 :].int(), query_start_loc, slots, has_initial)
