"""Prompt steps (and prompts mixed with decodes) replayed from CUDA graphs, one per token-count bucket.

An eager prompt step of the 8B shape spends far longer launching kernels than the GPU spends running
them (20.9 ms of wall for 6.3 ms of GPU work at 64 tokens). A bucket of T tokens holds any step of at
most T tokens over at most min(T, max_num_seqs) sequences: the real tokens first, then pad tokens
that belong to no sequence (their KV slot is -1: nothing written; attention leaves their rows and
no logit reads them), then empty sequences (no tokens, no keys). Attention launches the decode and
the prefill kernel over every sequence, each taking those of its kind (one query token or more:
known on the device only), with grids that depend only on the bucket's shapes. The logits are
those of each sampling sequence's last token, gathered inside the graph through a static index.

What runs eagerly instead (ModelRunner decides): steps larger than the largest bucket, models with
recurrent layers (each sequence's state slot and its first-chunk flag would need static buffers of
their own), steps that compute image tokens (image embeddings spliced per step) and every step of an
image-text model with M-RoPE positions, prompt logprobs, speculative verify rows, and adapters with
their own embed_tokens / lm_head / norms.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sloth_kernels.attention import AttnMetadata

from ..models.layers import StepMetadata

logger = logging.getLogger(__name__)

# A step of 16 tokens or fewer is short enough that padding it to 16 costs nothing measurable. Past
# 1,024 tokens the 8B shape's step is longer on the H200 than launching its kernels eagerly.
DEFAULT_PREFILL_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024)
# Tokens of a step beside decodes that keep it within about 3x a decode step. 8B shape, H200, 16
# streams decoding while 3,000-token prompts arrive (bench/results/prefill-graphs-h200.md): decode
# steps 7.3 ms, the 512-token bucket's steps (448 prompt tokens) 25.5 ms; the 384-token bucket's
# (320 prompt tokens) are expected near 20 ms from the per-token cost measured there.
STEP_TOKENS_BESIDE_DECODES = 384

# (input_ids, positions, meta, sample_index) -> logits of the sampled rows
ForwardAt = Callable[[torch.Tensor, torch.Tensor, StepMetadata, torch.Tensor], torch.Tensor]


def default_prefill_buckets(max_num_batched_tokens: int) -> list[int]:
    return [t for t in DEFAULT_PREFILL_BUCKETS if t <= max_num_batched_tokens]


def prefill_bound_while_decoding(setting: int | None, max_num_seqs: int) -> int:
    """The prompt tokens of a step beside decodes (the scheduler's bound), unless set: what leaves
    room in a step of STEP_TOKENS_BESIDE_DECODES (a default bucket) for a token of every sequence,
    so that the step replays a graph rather than running eagerly (launch-bound: 39 ms for 512
    tokens of the 8B shape on the H200, 19 ms replayed), but at least half of it, where very many
    sequences would leave prompts little."""
    if setting is not None:
        return setting
    return max(STEP_TOKENS_BESIDE_DECODES - max_num_seqs, STEP_TOKENS_BESIDE_DECODES // 2)


class PrefillGraphs:
    def __init__(
        self,
        forward: ForwardAt,
        buckets: list[int],
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        if not buckets or min(buckets) < 2:
            raise ValueError(f"prefill CUDA-graph buckets must be token counts of at least 2; got {buckets}")
        self.forward = forward
        self.buckets = sorted(set(buckets))
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.width = max_blocks_per_seq
        self.device = device
        t, s = self.buckets[-1], self.seqs_for(self.buckets[-1])
        i32, i64 = torch.int32, torch.long
        self.input_ids = torch.zeros(t, dtype=i64, device=device)
        self.positions = torch.zeros(t, dtype=i64, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=i64, device=device)
        self.lora_slots = torch.full((t,), -1, dtype=i32, device=device)
        self.seq_lens = torch.zeros(s, dtype=i32, device=device)
        self.query_start_loc = torch.zeros(s + 1, dtype=i32, device=device)
        self.sample_index = torch.zeros(s, dtype=i64, device=device)
        self.block_tables = torch.zeros(s, max_blocks_per_seq, dtype=i32, device=device)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0
        # One pinned staging buffer per alternation (as DecodeGraphs): ids, positions, slots, LoRA
        # slots [t each], then seq_lens, sample_index [s each], query_start_loc [s + 1], block tables.
        size = 4 * t + 3 * s + 1 + s * max_blocks_per_seq
        self.staging = [torch.zeros(size, dtype=i64, pin_memory=device.type == "cuda") for _ in range(2)]
        self.staging_np = [b.numpy() for b in self.staging]
        self._uploaded: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.pool: Any = None

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def seqs_for(self, tokens: int) -> int:
        """Sequences a bucket holds: every one has at least one token."""
        return min(tokens, self.max_num_seqs)

    def bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        i = bisect.bisect_left(self.buckets, num_tokens)
        if i == len(self.buckets) or num_seqs > self.seqs_for(self.buckets[i]):
            return None
        return self.buckets[i]

    def _meta(self, t: int, with_lora: bool) -> StepMetadata:
        s = self.seqs_for(t)
        attn = AttnMetadata(
            slot_mapping=self.slot_mapping[:t],
            block_tables=self.block_tables[:s],
            seq_lens=self.seq_lens[:s],
            query_start_loc=self.query_start_loc[: s + 1],
            seq_lens_host=[],  # the CUDA kernels read only the tensors and max_query_len
            query_start_loc_host=[],
            max_query_len=t,  # an upper bound: it picks the query tile, the grid covers every sequence
            max_seq_len=self.width * self.block_size,
            num_decodes=-1,  # each sequence of one query token through the decode kernel, the rest not
        )
        return StepMetadata(attn, self.lora_slots[:t] if with_lora else None)

    def capture_all(self, with_lora: bool, pool: Any = None) -> None:
        """Capture every bucket (largest first, so that the smaller ones reuse its memory). `pool`:
        a graph memory pool to share (the decode graphs'; steps never run at the same time)."""
        start = time.perf_counter()
        self.pool = pool if pool is not None else self.pool
        for t in reversed(self.buckets):
            self._capture(t, with_lora)
        logger.info("captured %d prefill CUDA graphs (tokens %s, LoRA %s) in %.1fs", len(self.buckets),
                    self.buckets, with_lora, time.perf_counter() - start)

    def _capture(self, t: int, with_lora: bool) -> None:
        s = self.seqs_for(t)
        # The t tokens spread over the s sequences, each a prompt from position 0 whose KV goes
        # nowhere (its keys read from block 0): shapes are what count.
        starts = torch.arange(s + 1, device=self.device) * t // s
        self.slot_mapping[:t] = -1
        self.query_start_loc[: s + 1] = starts
        self.seq_lens[:s] = starts[1:] - starts[:-1]
        firsts = torch.repeat_interleave(starts[:-1], self.seq_lens[:s])  # each token's sequence start
        self.positions[:t] = torch.arange(t, device=self.device) - firsts
        self.sample_index[:s] = starts[1:] - 1
        self.block_tables[:s] = 0
        meta = self._meta(t, with_lora)
        ids, pos, index = self.input_ids[:t], self.positions[:t], self.sample_index[:s]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self.forward(ids, pos, meta, index)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(ids, pos, meta, index)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(t, with_lora)] = (graph, logits)

    def invalidate(self) -> None:
        self.graphs.clear()

    def forget_lora(self) -> None:
        """Drop the LoRA graphs (their memory returns to the pool); missing ones are captured again
        when a step needs them (decode) or the step runs eagerly (prompts)."""
        for key in [key for key in self.graphs if key[1]]:
            del self.graphs[key]

    def has(self, num_tokens: int, num_seqs: int, with_lora: bool) -> bool:
        t = self.bucket_for(num_tokens, num_seqs)
        return t is not None and (t, with_lora) in self.graphs

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        query_start_loc: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        sample_index: list[int],
        lora_slots: np.ndarray | None,
        start_event: torch.cuda.Event | None = None,
    ) -> torch.Tensor | None:
        """Replay the bucket's graph; returns logits [len(sample_index), vocab], or None when no
        captured bucket holds the step. Each array is per token (ids, rotary positions, KV slots,
        adapter slots); query_start_loc, seq_lens and block tables per sequence."""
        n, b = len(input_ids), len(seq_lens)
        t = self.bucket_for(n, b)
        with_lora = lora_slots is not None
        if t is None or (t, with_lora) not in self.graphs:
            return None
        s, width = self.seqs_for(t), self.width
        self._turn ^= 1
        host, h = self.staging[self._turn], self.staging_np[self._turn]
        uploaded = self._uploaded[self._turn]
        if uploaded is not None:
            uploaded.synchronize()  # this buffer's last upload has run (almost always long since)
        h[: 4 * t] = 0
        h[:n] = input_ids
        h[t : t + n] = positions
        h[2 * t : 3 * t] = -1  # pad tokens write no KV
        h[2 * t : 2 * t + n] = slots
        h[3 * t : 4 * t] = -1
        if lora_slots is not None:
            h[3 * t : 3 * t + n] = lora_slots
        o = 4 * t
        h[o : o + s] = 0
        h[o : o + b] = seq_lens
        h[o + s : o + 2 * s] = sample_index[-1] if sample_index else 0
        h[o + s : o + s + len(sample_index)] = sample_index
        o += 2 * s
        h[o : o + s + 1] = query_start_loc[-1]  # empty sequences after the last one
        h[o : o + b + 1] = query_start_loc
        o += s + 1
        tables = h[o : o + s * width].reshape(s, width)
        tables[:] = 0
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        size = o + s * width
        dev = host[:size].to(self.device, non_blocking=True)
        if self.device.type == "cuda":  # (the CPU tests replay a stand-in graph: no events there)
            if uploaded is None:
                uploaded = self._uploaded[self._turn] = torch.cuda.Event()
            uploaded.record()
        self.input_ids[:t].copy_(dev[:t])
        self.positions[:t].copy_(dev[t : 2 * t])
        self.slot_mapping[:t].copy_(dev[2 * t : 3 * t])
        self.lora_slots[:t].copy_(dev[3 * t : 4 * t])
        o = 4 * t
        self.seq_lens[:s].copy_(dev[o : o + s])
        self.sample_index[:s].copy_(dev[o + s : o + 2 * s])
        o += 2 * s
        self.query_start_loc[: s + 1].copy_(dev[o : o + s + 1])
        o += s + 1
        self.block_tables[:s].copy_(dev[o:size].view(s, width))
        graph, logits = self.graphs[(t, with_lora)]
        if start_event is not None:
            start_event.record()
        graph.replay()
        self.num_replays += 1
        return logits[: len(sample_index)]
