"""The draft model: a small model of the target's tokenizer that proposes k tokens per sequence.

Its KV cache has tensors of its own but the target's block tables: position p of a sequence sits in
the same slot in both caches, so the draft needs no block bookkeeping of its own and the target's
rollback (trimmed blocks, preemption) is the draft's too. `Sequence.num_draft_computed` counts the
positions whose draft KV is valid; each proposal first catches up from there to the sequence's last
token (a prompt the first time, the tokens accepted since otherwise), then feeds its own proposals
one at a time. It runs without adapters: one draft serves every request. On CUDA its single-token
steps (all but a catch-up of several tokens) replay CUDA graphs of their own, as the target's
decode steps do.
"""

from __future__ import annotations

import torch

from sloth_kernels.attention import AttnMetadata

from ...models.layers import StepMetadata, fuse_quantized_projections
from ...models.weights import CausalLM
from ..cuda_graphs import DecodeGraphs
from ..device import to_device
from ..sampler import Sampler
from ..sampling_params import SamplingParams
from ..sequence import Sequence
from .rejection import target_probs


class DraftRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, max_model_len: int = 2048, graph_buckets: list[int] | None = None) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        if device.type == "cuda":
            fuse_quantized_projections(model)
        cfg = model.config
        self.kv_caches = [  # each layer's own shape; one block more: the target's scratch block
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for shape in ((num_blocks + 1, block_size, heads, dim) for heads, dim in cfg.kv_cache_shapes())
        ]
        self.graphs: DecodeGraphs | None = None
        if graph_buckets and device.type == "cuda":
            self.graphs = DecodeGraphs(self._forward_logits, graph_buckets, -(-max_model_len // block_size),
                                       num_blocks, block_size, device)
            with torch.inference_mode():
                self.graphs.capture_all(with_lora=False)

    def _forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, positions, meta, self.kv_caches))

    @torch.inference_mode()
    def warmup(self, prompt_lens: tuple[int, ...] = (5, 16, 100, 160, 300, 512)) -> None:
        """Run catch-up steps of these lengths once, so that the eager kernels for the draft's shapes
        compile at start-up rather than during the first requests. Every position writes into the
        scratch block (nobody reads it), so the cache holds nothing of it."""
        scratch = self.kv_caches[0][0].shape[0] - 1
        for n in prompt_lens:
            seq = Sequence("draft-warmup", [0] * n, SamplingParams(max_tokens=1, temperature=0))
            seq.block_table = [scratch] * -(-n // self.block_size)
            self._forward([seq], [0], [seq.token_ids])

    @staticmethod
    def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * block_size * sum(heads * dim for heads, dim in cfg.kv_cache_shapes()) * itemsize

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_tokens: list[int], sampler: Sampler,
                draft_probs: dict[str, torch.Tensor]) -> None:
        """Set each sequence's spec_token_ids to num_tokens[i] draft tokens (greedy for greedy
        requests, else drawn from the draft's distribution under the request's temperature, top-k,
        top-p and min-p, which go to `draft_probs` for the rejection sampler). Every sequence's
        blocks must cover its last token's position + num_tokens[i]."""
        if not seqs:
            return
        starts = [min(seq.num_draft_computed, seq.num_computed_tokens) for seq in seqs]
        # A token the draft has no embedding for (Llama 3.2 Vision's <|image|>, past the text
        # vocabulary; an adapter's added token) is fed as token 0: the target verifies every proposal.
        vocab = self.model.config.vocab_size
        chunks = [[t if t < vocab else 0 for t in seq.token_ids[start:]] for seq, start in zip(seqs, starts, strict=True)]
        proposals: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        live = list(range(len(seqs)))
        for step in range(max(num_tokens)):
            logits = self._forward([seqs[i] for i in live], [starts[i] for i in live], [chunks[i] for i in live])
            tokens, q = self._draw(logits, [seqs[i] for i in live], sampler)
            for row, i in enumerate(live):
                proposals[i].append(tokens[row])
                if q is not None and not seqs[i].params.is_greedy:
                    probs[i].append(q[row])
                starts[i] += len(chunks[i])
                chunks[i] = [tokens[row]]
            live = [i for i in live if num_tokens[i] > step + 1]
        for i, seq in enumerate(seqs):
            seq.spec_token_ids = proposals[i]
            # The last proposal's KV was never computed: valid up to (not including) its position.
            seq.num_draft_computed = seq.num_tokens + num_tokens[i] - 1
            if probs[i]:
                draft_probs[seq.request_id] = torch.stack(probs[i])

    def _forward(self, seqs: list[Sequence], starts: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """Logits of each sequence's last fed position, after writing the fed positions' KV."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        for seq, start, chunk in zip(seqs, starts, chunks, strict=True):
            end = start + len(chunk)
            ids += chunk
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + len(chunk))
        lens = [len(c) for c in chunks]
        if self.graphs is not None and max(lens) == 1 and len(seqs) <= self.graphs.max_batch:
            replayed = self.graphs.run(ids, positions, slots, [seq.block_table for seq in seqs], seq_lens, None)
            if replayed is not None:
                return replayed  # the graph's own output buffer: read before the next replay
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        attn = AttnMetadata(
            slot_mapping=self._tensor(slots), block_tables=self._tensor(tables, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32), query_start_loc=self._tensor(query_start_loc, torch.int32),
            seq_lens_host=seq_lens, query_start_loc_host=query_start_loc, max_query_len=max(lens),
            max_seq_len=max(seq_lens), num_decodes=len(seqs) if max(lens) == 1 else 0,
        )
        hidden = self.model(self._tensor(ids), self._tensor(positions), StepMetadata(attn), self.kv_caches)
        return self.model.compute_logits(hidden[self._tensor([q - 1 for q in query_start_loc[1:]])])

    @staticmethod
    def _draw(logits: torch.Tensor, seqs: list[Sequence], sampler: Sampler) -> tuple[list[int], torch.Tensor | None]:
        """Each row's draft token and, when some request samples, the distribution it came from."""
        if all(seq.params.is_greedy for seq in seqs):
            return logits.argmax(dim=-1).tolist(), None
        q = target_probs(logits, seqs)
        noise = torch.empty_like(q).exponential_()
        for row, seq in enumerate(seqs):
            gen = sampler.generators.get(seq.request_id)
            if gen is not None:
                noise[row].exponential_(generator=gen)
        drawn = (q / noise).masked_fill(q <= 0, -1.0).argmax(dim=-1)
        tokens = torch.where(torch.tensor([s.params.is_greedy for s in seqs], device=q.device),
                             logits.argmax(dim=-1), drawn)
        return tokens.tolist(), q

    def _tensor(self, data: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return to_device(data, self.device, dtype)
