"""Decode steps replayed from CUDA graphs, one captured per batch-size bucket.

A decode step (one new token per sequence) has the same shapes every time for a given batch size,
so its whole forward pass and the logits are captured once and replayed: the kernel launches cost
nothing on the CPU. Inputs live in static buffers sized for the largest bucket; a smaller batch is
padded to its bucket with rows that write their KV into a scratch block nobody reads. Models with
recurrent layers also take each row's state slot (padded rows: the scratch state row).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from sloth_kernels.attention import AttnMetadata
from sloth_kernels.state_batch import StateBatch

from ..models.layers import StepMetadata

logger = logging.getLogger(__name__)


def default_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8, *range(16, max_num_seqs + 1, 16)]
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor, StepMetadata], torch.Tensor],
        buckets: list[int],
        max_blocks_per_seq: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
        scratch_state: int | None = None,
    ) -> None:
        self.forward = forward  # (input_ids, positions, meta) -> logits
        self.buckets = sorted(buckets)
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        n = self.buckets[-1]
        i32, i64 = torch.int32, torch.long
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.zeros(n, dtype=i64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=i32, device=device)
        self.seq_lens = torch.ones(n, dtype=i32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=i32, device=device)
        self.lora_slots = torch.full((n,), -1, dtype=i32, device=device)
        # Models with recurrent layers (scratch_state: the state row padded rows use): each row's slot.
        self.scratch_state = scratch_state
        self.state_slots = torch.full((n,), scratch_state or 0, dtype=i64, device=device)
        self.state_initial = torch.ones(n, dtype=torch.bool, device=device)  # a decode continues its state
        self.segments = 6 if scratch_state is not None else 5  # staged per-row inputs before the block tables
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Pinned staging buffers for the replays' inputs (pinned allocation per step is slow), written
        # through numpy views, then copied to the device in one transfer. Two, alternating: with
        # async scheduling the previous replay's upload may not have run yet when the next is
        # prepared. Each has an event recorded after its upload: a step that samples nothing (a
        # one-token prompt chunk) is never waited on, so the buffer's next user checks it first.
        self.width = max_blocks_per_seq
        self.staging = [torch.zeros(n * (self.segments + max_blocks_per_seq), dtype=i64, pin_memory=True)
                        for _ in range(2)]
        self.staging_np = [t.numpy() for t in self.staging]
        self._uploaded: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.pool: Any = None  # the memory pool the graphs share

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, batch: int) -> int | None:
        i = bisect.bisect_left(self.buckets, batch)
        return self.buckets[i] if i < len(self.buckets) else None

    def _meta(self, n: int, with_lora: bool) -> StepMetadata:
        attn = AttnMetadata(
            slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:n],
            seq_lens=self.seq_lens[:n],
            query_start_loc=self.query_start_loc[: n + 1],
            seq_lens_host=[1] * n,
            query_start_loc_host=list(range(n + 1)),
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.block_size,
            num_decodes=n,
        )
        meta = StepMetadata(attn, self.lora_slots[:n] if with_lora else None, None)
        if self.scratch_state is not None:  # static tensors only: a replay reads them where they were captured
            meta.state = StateBatch(self.query_start_loc[: n + 1], self.state_slots[:n], self.state_initial[:n],
                                    self.query_start_loc[:n], list(range(n + 1)), [], [])
        return meta

    def capture_all(self, with_lora: bool) -> None:
        start = time.perf_counter()
        for n in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self._capture(n, with_lora)
        logger.info("captured %d decode CUDA graphs (batch %s, LoRA %s) in %.1fs", len(self.buckets),
                    self.buckets, with_lora, time.perf_counter() - start)

    def _capture(self, n: int, with_lora: bool) -> None:
        self.slot_mapping[:n] = self.scratch_block * self.block_size
        self.block_tables[:n] = self.scratch_block
        if self.scratch_state is not None:
            self.state_slots[:n] = self.scratch_state
        meta = self._meta(n, with_lora)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self.forward(self.input_ids[:n], self.positions[:n], meta)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(self.input_ids[:n], self.positions[:n], meta)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(n, with_lora)] = (graph, logits)

    def invalidate(self) -> None:
        self.graphs.clear()

    def forget_lora(self) -> None:
        """Drop the LoRA graphs (their memory returns to the pool); missing ones are captured again
        when a step needs them (decode) or the step runs eagerly (prompts)."""
        for key in [key for key in self.graphs if key[1]]:
            del self.graphs[key]

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        block_tables: list[list[int]],
        seq_lens: list[int],
        lora_slots: list[int] | None,
        start_event: torch.cuda.Event | None = None,
        input_ids_device: torch.Tensor | None = None,
        state_slots: list[int] | None = None,
    ) -> torch.Tensor | None:
        """Replay the bucket's graph for this decode batch; returns logits [batch, vocab], or None
        when the batch is larger than every bucket. `start_event` is recorded just before the replay.
        `state_slots`: each row's state slot (models with recurrent layers; every row continues its state).
        `input_ids_device` (on the device) replaces `input_ids`: ids sampled by a step whose tokens
        the host has not read yet (async scheduling)."""
        b = len(input_ids)
        n = self.bucket_for(b)
        if n is None:
            return None
        with_lora = lora_slots is not None
        if (n, with_lora) not in self.graphs:
            self._capture(n, with_lora)
        scratch = self.scratch_block
        width = self.width
        self._turn ^= 1
        host, h = self.staging[self._turn], self.staging_np[self._turn]
        uploaded = self._uploaded[self._turn]
        if uploaded is not None:
            uploaded.synchronize()  # this buffer's last upload has run (almost always long since)
        h[:n] = 0
        h[:b] = input_ids
        h[n : 2 * n] = 0
        h[n : n + b] = positions
        h[2 * n : 3 * n] = scratch * self.block_size
        h[2 * n : 2 * n + b] = slots
        h[3 * n : 4 * n] = 1
        h[3 * n : 3 * n + b] = seq_lens
        h[4 * n : 5 * n] = -1
        if lora_slots is not None:
            h[4 * n : 4 * n + b] = lora_slots
        seg = self.segments
        if self.scratch_state is not None:
            assert state_slots is not None, "a model with recurrent layers replays with its rows' state slots"
            h[5 * n : 6 * n] = self.scratch_state
            h[5 * n : 5 * n + b] = state_slots
        tables = h[seg * n : seg * n + n * width].reshape(n, width)
        tables[:] = scratch
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        dev = host[: seg * n + n * width].to(self.device, non_blocking=True)
        if uploaded is None:
            uploaded = self._uploaded[self._turn] = torch.cuda.Event()
        uploaded.record()
        self.input_ids[:n].copy_(dev[:n])
        if input_ids_device is not None:
            self.input_ids[:b].copy_(input_ids_device)
        self.positions[:n].copy_(dev[n : 2 * n])
        self.slot_mapping[:n].copy_(dev[2 * n : 3 * n])
        self.seq_lens[:n].copy_(dev[3 * n : 4 * n])
        self.lora_slots[:n].copy_(dev[4 * n : 5 * n])
        if self.scratch_state is not None:
            self.state_slots[:n].copy_(dev[5 * n : 6 * n])
        self.block_tables[:n].copy_(dev[seg * n :].view(n, width))
        graph, logits = self.graphs[(n, with_lora)]
        if start_event is not None:
            start_event.record()  # device time from here: the replay, not the host's preparation
        graph.replay()
        return logits[:b]
