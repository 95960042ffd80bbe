"""Runs one scheduled step on the model: flattens the batch into token ids, positions, KV slots and
block tables, runs one forward pass over the mixed prefill + decode tokens, samples, and copies the
new tokens to the host once."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from sloth_kernels.attention import AttnMetadata
from sloth_kernels.rope_scaling import long_prompt_threshold, rope_rows
from sloth_kernels.state_batch import StateBatch

from ..models.layers import StatefulModel, StepMetadata, fuse_quantized_projections
from ..models.per_adapter import AdapterStep
from ..models.weights import CausalLM
from .cuda_graphs import DecodeGraphs
from .decode_rows import decode_rows, token_at
from .device import to_device
from .lora_manager import LoRAManager
from .prefill_graphs import PrefillGraphs
from .sampler import Sampler, gather_logprobs, gather_prompt_logprobs
from .scheduler import ScheduledBatch
from .sequence import TokenLogprob
from .slot_modules import SlotModuleTable
from .spec_decode.rejection import sample_with_drafts
from .vision_inputs import VisionInputs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: StepMetadata
    sample_rows: list[int]  # batch index of each sequence that samples this step
    # Its last token's row in the flat batch (a speculating sequence: its last 1 + k rows), then
    # prompt_spans' rows.
    sample_token_index: torch.Tensor
    adapters: AdapterStep | None = None  # adapters of the step with their own embed/lm_head/norms
    # (batch index, first prompt token scored, count) of each sequence asking for prompt logprobs:
    # rows of positions whose next token is a prompt token, after the sampled rows in the index.
    prompt_spans: list[tuple[int, int, int]] = field(default_factory=list)
    prompt_targets: torch.Tensor | None = None  # the prompt token each of those rows scores


@dataclass(slots=True)
class LaunchedDecode:
    """A decode step queued on the device whose tokens the host has not read yet (async scheduling)."""

    batch: ScheduledBatch
    tokens: torch.Tensor  # [len(batch.seqs)] on the device, in batch order
    host: torch.Tensor  # pinned: where `tokens` is being copied
    ready: torch.cuda.Event | None  # recorded after that copy (None on the CPU)
    timing: tuple[torch.cuda.Event, torch.cuda.Event] | None
    cpu_seconds: float | None  # the forward's time on the CPU (no events there)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        lora_manager: LoRAManager | None = None,
        max_model_len: int = 2048,
        cuda_graph_buckets: list[int] | None = None,
        num_state_slots: int = 0,
        num_state_snapshots: int = 0,
        prefill_graph_buckets: list[int] | None = None,
        max_num_seqs: int = 64,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        # longrope: the tokens of a prompt longer than the original context read long-factor rows.
        self.long_prompt_from = long_prompt_threshold(model.config.rope_scaling)
        if device.type == "cuda":
            # q|k|v and gate|up kept in 4-bit become one weight each: one kernel launch instead of
            # three or two (on the CPU the slices run apart, as the reference checks expect).
            fuse_quantized_projections(model)
        cfg = model.config
        # One block more than the block manager hands out: the scratch block that padded rows of a
        # CUDA-graph batch write into.
        self.scratch_block = num_blocks
        # One (keys, values) pair per KV layer (a hybrid model's recurrent layers keep a state instead),
        # each of its layer's shape; every layer's block i holds the same tokens.
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for shape in ((num_blocks + 1, block_size, heads, dim) for heads, dim in cfg.kv_cache_shapes())
        ]
        if cfg.has_state:  # one row more: the scratch row, as for the KV cache
            cast(StatefulModel, model).allocate_state(num_state_slots + 1 + num_state_snapshots, dtype, device)
        self.lora_manager = lora_manager
        # Adapters' own embed_tokens / lm_head / norms (modules_to_save), on the device while in a slot
        self.slot_modules = SlotModuleTable(model, dtype, device)
        self.sampler = Sampler(device)
        # Image-text models: the vision encoder's cache, each step's M-RoPE positions or key ends
        self.vision = VisionInputs(model, device, lora=lora_manager) if getattr(model, "is_vision", False) else None  # type: ignore[arg-type]
        # Speculative decoding with a draft model: the draft's distribution q over each proposed
        # token of a sampled request, by request id (spec_decode/draft.py fills it every step).
        self.draft_probs: dict[str, torch.Tensor] = {}
        self._timing: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._cpu_forward_seconds: float | None = None
        # Sampled tokens come back through pinned buffers and events: waiting on an event lets go
        # of the GIL, so the API thread streams the previous step's tokens while the GPU works.
        self._host_tokens: list[tuple[torch.Tensor | None, torch.cuda.Event | None]] = [(None, None), (None, None)]
        self._turn = 0
        self._launched_called = False  # whether run() has called its on_launched yet
        self.graphs: DecodeGraphs | None = None
        if cuda_graph_buckets and device.type == "cuda":
            self.graphs = DecodeGraphs(
                self._forward_logits, cuda_graph_buckets, -(-max_model_len // block_size),
                self.scratch_block, block_size, device, num_state_slots if cfg.has_state else None,
            )
        # Prompt steps from graphs too, where the model's step has nothing but token ids, positions,
        # KV slots and LoRA slots (prefill_graphs.py says what stays eager and why).
        self.prefill_graphs: PrefillGraphs | None = None
        prefill_graph_buckets = self.prefill_graph_buckets(model, prefill_graph_buckets, max_num_seqs, max_model_len,
                                                           device)
        if prefill_graph_buckets:
            self.prefill_graphs = PrefillGraphs(self._forward_logits_at, prefill_graph_buckets, max_num_seqs,
                                                -(-max_model_len // block_size), block_size, device)

    @staticmethod
    def prefill_graph_buckets(model: CausalLM, buckets: list[int] | None, max_num_seqs: int, max_model_len: int,
                              device: torch.device) -> list[int]:
        """The prompt-step buckets captured for this model (none: its prompt steps run eagerly)."""
        cfg = model.config
        # An image-text model with M-RoPE needs its 3-row positions per step: eager; Gemma 3 with images
        # replays its steps without image tokens (_replay_prefill).
        text_steps_only = not getattr(model, "is_vision", False) or not getattr(model, "uses_mrope", True)
        if device.type != "cuda" or cfg.has_state or not text_steps_only or cfg.num_experts:
            return []
        # (No step holds more tokens than max_num_seqs sequences of max_model_len.)
        return [t for t in buckets or () if t <= max_num_seqs * max_model_len]

    def _forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, positions, meta, self.kv_caches))

    def _forward_logits_at(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                           sample_index: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        return self.model.compute_logits(hidden[sample_index])

    def capture_graphs(self) -> None:
        with_lora = self.lora_manager is not None and self.lora_manager.has_slots
        with torch.inference_mode():
            if self.graphs is not None:
                self._capture_decode_graphs(with_lora)
            if self.prefill_graphs is not None:  # in the decode graphs' pool: steps never overlap
                self.prefill_graphs.capture_all(with_lora, self.graphs.pool if self.graphs is not None else None)

    def _capture_decode_graphs(self, with_lora: bool) -> None:
        """Capture the decode graphs. A generic-path model (transformers' own modules: the Qwen-VL
        image-text models) whose decode step does what a capture cannot (reads a tensor on the host,
        copies from pageable memory) runs its decode steps eagerly instead, with a warning, rather
        than failing to start."""
        assert self.graphs is not None
        try:
            self.graphs.capture_all(with_lora=with_lora)
        except RuntimeError as e:
            if not getattr(self.model, "is_generic", False):
                raise
            logger.warning("%s: capturing the decode CUDA graphs failed (%s); its decode steps run eagerly, "
                           "launching every kernel from Python (slower)", type(self.model).__name__,
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.graphs = None

    def capture_lora_graphs_again(self) -> None:
        """The LoRA graphs again, after tensors they read were replaced (MoE expert LoRA tables made
        or widened, the old ones freed). The old graphs go first: should a capture fail (out of
        memory), none is left to replay reads of freed memory, and their memory is the new ones'."""
        if self.graphs is not None:
            self.graphs.forget_lora()
        if self.prefill_graphs is not None:
            self.prefill_graphs.forget_lora()
        self.capture_graphs()

    @property
    def last_forward_seconds(self) -> float | None:
        """Device time of the latest forward pass. On CUDA it is read from events of a step whose
        results were already copied to the host, so reading it never waits on the GPU."""
        if self._timing is None:
            return self._cpu_forward_seconds
        start, end = self._timing
        self._timing = None
        return start.elapsed_time(end) / 1000 if end.query() else None

    @staticmethod
    def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * block_size * sum(heads * dim for heads, dim in cfg.kv_cache_shapes()) * itemsize

    @staticmethod
    def state_bytes(model: CausalLM, num_slots: int, dtype: torch.dtype) -> int:
        """What the state cache of `num_slots` slots (and the scratch row) takes; 0 without recurrent layers."""
        if not model.config.has_state:
            return 0
        return (num_slots + 1) * cast(StatefulModel, model).state_bytes_per_slot(dtype)

    @torch.inference_mode()
    def copy_states(self, copies: list[tuple[int, int]]) -> None:
        """Copy rows of every state tensor (prefix-cache snapshots taken and restored), in order: a
        snapshot taken last step may be restored into another slot by this one."""
        tensors: list[torch.Tensor] = self.model.state_tensors()  # type: ignore[union-attr, operator]
        for t in tensors:
            for src, dst in copies:
                t[dst].copy_(t[src])

    def prepare(self, batch: ScheduledBatch, lookahead_ids: torch.Tensor | None = None) -> StepInputs:
        """The step's flat inputs. With `lookahead_ids` (a decode batch, on the device) each
        sequence computes the position after its last host-side token, fed that id."""
        ahead = lookahead_ids is not None
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        sample_rows: list[int] = []
        sample_index: list[int] = []
        sample_adapters: list[int] = []
        adapter_per_token: list[int] = []
        prompt_spans: list[tuple[int, int, int]] = []
        prompt_index: list[int] = []
        prompt_targets: list[int] = []
        starts: list[int] = []
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_tokens if ahead else seq.num_computed_tokens
            starts.append(start)
            end = start + n
            if seq.spec_token_ids and not ahead:  # the step verifies the draft tokens after the last
                input_ids.extend([*seq.token_ids[start:], *seq.spec_token_ids][:n])
            else:
                input_ids.extend(seq.token_ids[start:end])  # nothing when ahead: that id is on the device
            positions.extend(self._rope_rows(seq.num_prompt_tokens, start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + n)
            adapter_per_token.extend([seq.adapter_id] * n)
            if batch.samples(i):
                sample_rows.append(i)
                num_rows = 1 + (0 if ahead else len(seq.spec_token_ids))
                sample_index.extend(range(query_start_loc[-1] - num_rows, query_start_loc[-1]))
                sample_adapters.extend([seq.adapter_id] * num_rows)
            # Prompt logprobs: position p's logits score prompt token p + 1, for this chunk's p.
            scored_end = min(end, seq.num_prompt_tokens - 1)
            if seq.params.prompt_logprobs is not None and scored_end > start:
                prompt_spans.append((i, start + 1, scored_end - start))
                first_row = query_start_loc[-2]
                prompt_index.extend(range(first_row, first_row + scored_end - start))
                prompt_targets.extend(seq.token_ids[start + 1 : scored_end + 1])
        meta = StepMetadata(self._attn_metadata(batch, slots, seq_lens, query_start_loc))
        if self.vision is not None:
            meta.vision = self.vision.step(batch.seqs, starts, batch.num_new_tokens)
            if meta.vision is not None:  # Gemma 3: an image's tokens attend to each other both ways
                meta.attn.key_ends = meta.vision.key_ends
        if self.model.config.has_state:  # a sequence at its first token starts from an empty state
            state_slots = [seq.state_slot for seq in batch.seqs]
            assert None not in state_slots, "a sequence of a model with recurrent layers runs without a state slot"
            meta.state = StateBatch.build(query_start_loc, state_slots,  # type: ignore[arg-type]
                                          [start > 0 for start in starts], self.device)
        adapters = {seq.adapter_id for seq in batch.seqs} - {0}
        own_modules = None
        if adapters:
            assert self.lora_manager is not None, "a request asked for an adapter but LoRA is not enabled"
            slot_of = self.lora_manager.assign_slots(adapters)
            meta.lora_slots = self._tensor([slot_of.get(a, -1) for a in adapter_per_token], torch.int32)
            meta.active_lora_slots = sorted(slot_of.values())
            own_modules = self.slot_modules.step(self.lora_manager, adapter_per_token, sample_adapters
                                                 + [batch.seqs[i].adapter_id for i, _, n in prompt_spans for _ in range(n)])
        elif self.slot_modules.resident and self.lora_manager is not None:
            self.slot_modules.sync(self.lora_manager)  # a removed adapter's copies go with it
        ids = lookahead_ids if lookahead_ids is not None else self._tensor(input_ids)
        return StepInputs(ids, self._tensor(positions), meta, sample_rows, self._tensor(sample_index + prompt_index),
                          own_modules, prompt_spans, self._tensor(prompt_targets) if prompt_spans else None)

    def vocab_size(self, adapter_id: int) -> int:
        """The token ids a request for this adapter may hold and be given (0: the base model)."""
        weights = self.lora_manager.adapters.get(adapter_id) if self.lora_manager is not None and adapter_id else None
        return self.slot_modules.vocab_size(weights)

    def _rope_rows(self, num_prompt_tokens: int, start: int, end: int) -> range | list[int]:
        """Rotary-table rows of positions [start, end) (the model reads positions only for RoPE):
        the positions themselves but for a longrope prompt longer than the original context."""
        if self.long_prompt_from is None:
            return range(start, end)
        cfg = self.model.config
        return rope_rows(cfg.rope_scaling, cfg.max_position_embeddings, num_prompt_tokens, start, end)

    def _attn_metadata(
        self, batch: ScheduledBatch, slots: list[int], seq_lens: list[int], query_start_loc: list[int]
    ) -> AttnMetadata:
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]
        return AttnMetadata(
            slot_mapping=self._tensor(slots),
            block_tables=self._tensor(tables, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            query_start_loc=self._tensor(query_start_loc, torch.int32),
            seq_lens_host=seq_lens,
            query_start_loc_host=query_start_loc,
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
            num_decodes=next((i for i, n in enumerate(batch.num_new_tokens) if n != 1), len(batch.seqs)),
        )

    def _tensor(self, data: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return to_device(data, self.device, dtype)

    def _replay_decode(self, batch: ScheduledBatch, lookahead_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits from a CUDA graph when every sequence computes exactly one token (or verifies draft
        tokens: one row per position, decode_rows.py), else None. With `lookahead_ids`
        (device) each sequence computes the position after its last host-side token, whose id the
        previous step sampled and has not handed to the host yet."""
        graphs = self.graphs
        ahead = lookahead_ids is not None
        rows = decode_rows(batch, ahead) if graphs is not None else None
        if graphs is None or rows is None or len(rows) > graphs.max_batch:
            return None
        if any(s.params.prompt_logprobs is not None and s.num_computed_tokens + 1 < s.num_prompt_tokens
               for s in batch.seqs):
            return None  # a one-token prompt chunk that is scored: its logits come from the eager path
        has_state = self.model.config.has_state
        if has_state and (len(rows) != len(batch.seqs) or any(p == 0 for _, p in rows)):
            return None  # the graphs continue every row's state: a first token starts from none (eager)
        adapters = {seq.adapter_id for seq in batch.seqs} - {0}
        # Adapters with their own embed_tokens / lm_head / norms run eagerly: the graphs hold only the
        # base's modules (and stay as fast as they were), those rows need per-adapter gathers.
        if adapters and self.slot_modules.has_modules(self.lora_manager, adapters):
            return None
        # So do adapters with LoRA on MoE experts that run one by one (host-synchronizing); grouped
        # experts add theirs inside the graphs (sloth_kernels.triton_moe_lora).
        if adapters and self.lora_manager is not None and self.lora_manager.needs_eager_experts(adapters):
            return None
        bs = self.block_size
        positions = [p for _, p in rows]
        rope_positions = positions
        if self.vision is not None and any(seq.mm is not None for seq, _ in rows):
            # M-RoPE (Qwen3.5 and the Qwen-VL models with images): a token after the prompt sits at the
            # same position in all three rows, which the graph's plain RoPE then rotates by.
            plain = [self.vision.plain_position(seq, p) for seq, p in rows]
            if None in plain:
                return None  # an image's token as a one-token prompt chunk: eager
            rope_positions = cast(list[int], plain)
        lora_slots = None
        if adapters:
            assert self.lora_manager is not None
            slot_of = self.lora_manager.assign_slots(adapters)
            lora_slots = [slot_of.get(seq.adapter_id, -1) for seq, _ in rows]
        # A batch without adapters replays the base graphs (captured first, kept beside the LoRA
        # ones): no shrink / expand launches for slots nobody uses.
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        logits = graphs.run(
            input_ids=[0] * len(positions) if ahead else [token_at(seq, p) for seq, p in rows],
            input_ids_device=lookahead_ids,
            positions=rope_positions if self.long_prompt_from is None else [
                self._rope_rows(seq.num_prompt_tokens, p, p + 1)[0] for seq, p in rows],
            slots=[seq.block_table[p // bs] * bs + p % bs for seq, p in rows],
            block_tables=[seq.block_table for seq, _ in rows],
            seq_lens=[p + 1 for p in positions],
            lora_slots=lora_slots,
            start_event=events[0],
            state_slots=[seq.state_slot for seq, _ in rows] if has_state else None,  # type: ignore[misc]
        )
        events[1].record()
        self._timing = events
        return logits

    def _replay_prefill(self, batch: ScheduledBatch) -> tuple[list[int], torch.Tensor] | None:
        """The sampling rows and their logits from a prefill CUDA graph (a step with prompt chunks,
        decodes beside them or not), or None where the step runs eagerly: larger than every bucket,
        speculative verify rows, prompt logprobs, or adapters with their own modules."""
        graphs = self.prefill_graphs
        if graphs is None or any(s.spec_token_ids or s.params.prompt_logprobs is not None for s in batch.seqs):
            return None
        if self.vision is not None and self.vision.computes_images(batch.seqs, batch.num_new_tokens):
            return None  # image embeddings spliced and key ends: eager
        adapters = {seq.adapter_id for seq in batch.seqs} - {0}
        if not graphs.has(sum(batch.num_new_tokens), len(batch.seqs), bool(adapters)):
            return None
        if adapters and self.slot_modules.has_modules(self.lora_manager, adapters):
            return None
        if adapters and self.lora_manager is not None and self.lora_manager.needs_eager_experts(adapters):
            return None  # (models with experts have no prefill graphs; as for the decode graphs, should they)
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        rows: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            end = start + n
            ids.extend(seq.token_ids[start:end])
            positions.extend(self._rope_rows(seq.num_prompt_tokens, start, end))
            table = seq.block_table
            slots.extend([table[start // bs] * bs + start % bs] if n == 1 else
                         [table[p // bs] * bs + p % bs for p in range(start, end)])
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + n)
            if batch.samples(i):
                rows.append(i)
        lora_slots = None
        if adapters:
            assert self.lora_manager is not None
            slot_of = self.lora_manager.assign_slots(adapters)
            lora_slots = np.repeat([slot_of.get(seq.adapter_id, -1) for seq in batch.seqs], batch.num_new_tokens)
        cuda = self.device.type == "cuda"  # (the CPU tests replay a stand-in graph)
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        logits = graphs.run(np.asarray(ids), np.asarray(positions), np.asarray(slots), query_start_loc, seq_lens,
                            [seq.block_table for seq in batch.seqs], [query_start_loc[i + 1] - 1 for i in rows],
                            lora_slots, events[0] if events is not None else None)
        if logits is None:
            return None
        if events is not None:
            events[1].record()
            self._timing = events
        return rows, logits

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if self.device.type != "cuda":
            start = time.perf_counter()
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches, inputs.adapters)
            self._cpu_forward_seconds = time.perf_counter() - start
            return hidden
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches, inputs.adapters)
        events[1].record()
        self._timing = events
        return hidden

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, on_launched: Callable[[], None] | None = None
    ) -> tuple[list[int | None], list[TokenLogprob | None] | None]:
        """Returns, per scheduled sequence, its new token (None for a prompt chunk that does not
        reach the end) and its logprobs when asked. `on_launched` runs once the step's GPU work is
        queued and before waiting for it: host work placed there overlaps the GPU."""
        self._launched_called = False
        try:
            return self._run(batch, on_launched)
        finally:
            self._notify(on_launched)  # a step that failed or sampled nothing still runs it, once

    def _notify(self, on_launched: Callable[[], None] | None) -> None:
        if on_launched is not None and not self._launched_called:
            self._launched_called = True
            on_launched()

    def _run(
        self, batch: ScheduledBatch, on_launched: Callable[[], None] | None
    ) -> tuple[list[int | None], list[TokenLogprob | None] | None]:
        sampled: list[int | None] = [None] * len(batch.seqs)
        logits = self._replay_decode(batch)
        if logits is not None:
            rows = [i for i in range(len(batch.seqs)) if batch.samples(i)]
            if len(rows) < len(batch.seqs):  # one-token prompt chunks sample nothing
                starts = [0, *itertools.accumulate(batch.num_new_tokens)]  # verify steps: 1 + k rows each
                logits = logits[[r for i in rows for r in range(starts[i], starts[i + 1])]]
        elif (replayed := self._replay_prefill(batch)) is not None:
            rows, logits = replayed
            if not rows:
                return sampled, None
        else:
            # An eager step spends a while launching kernels: whatever waits for "launched" should
            # not wait that long (a graph replay is queued at once, so there it runs below).
            self._notify(on_launched)
            inputs = self.prepare(batch)
            hidden = self._forward(inputs)
            rows = inputs.sample_rows
            if not rows and not inputs.prompt_spans:
                return sampled, None
            if inputs.prompt_spans:
                logits = self._score_prompts(batch, inputs, hidden)
            else:
                logits = self.model.compute_logits(hidden[inputs.sample_token_index], inputs.adapters)
        if not rows:
            return sampled, None
        seqs = [batch.seqs[i] for i in rows]
        if any(seq.spec_token_ids for seq in seqs):  # speculative decoding: 1 + k rows per such sequence
            self._notify(on_launched)
            spec_tokens, spec_logprobs = sample_with_drafts(self.sampler, logits, seqs, self.draft_probs)
            for j, row in enumerate(rows):
                sampled[row] = spec_tokens[j]
            if spec_logprobs is None:
                return sampled, None
            return sampled, [spec_logprobs[rows.index(i)] if i in rows else None for i in range(len(batch.seqs))]
        tokens, raw_logprobs = self.sampler(logits, seqs)
        self._notify(on_launched)  # before gathering logprobs, which waits for the GPU
        logprobs: list[TokenLogprob | None] | None = None
        if raw_logprobs is not None:
            per_sample = gather_logprobs(raw_logprobs, tokens, seqs)
            logprobs = [None] * len(batch.seqs)
            for row, lp in zip(rows, per_sample, strict=True):
                logprobs[row] = lp
        for row, token in zip(rows, self._to_host(tokens), strict=True):
            sampled[row] = token
        return sampled, logprobs

    def _score_prompts(self, batch: ScheduledBatch, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        """Store this chunk's prompt logprobs in its sequences and return the sampled rows' logits.
        Indexed by position, so a step run again (a failed batch, a preempted sequence recomputed)
        overwrites rather than appends."""
        assert inputs.prompt_targets is not None
        index = inputs.sample_token_index
        num_scored = inputs.prompt_targets.shape[0]
        n = index.shape[0] - num_scored  # sampled rows (1 + k for a speculating sequence)
        if inputs.adapters is None:
            # A slice of scored rows' logits at a time: a long chunk's [rows, vocab] all at once could
            # take gigabytes the KV cache was sized without.
            def logits_of(a: int, b: int) -> torch.Tensor:
                return self.model.compute_logits(hidden[index[n + a : n + b]])
            logits = self.model.compute_logits(hidden[index[:n]]) if n else hidden.new_empty(0)
        else:  # adapters' own lm_heads are grouped over all the step's logit rows at once
            every = self.model.compute_logits(hidden[index], inputs.adapters)
            logits = every[:n]

            def logits_of(a: int, b: int) -> torch.Tensor:
                return every[n + a : n + b]
        k = max(batch.seqs[i].params.prompt_logprobs or 0 for i, _, _ in inputs.prompt_spans)
        scored = gather_prompt_logprobs(logits_of, num_scored, inputs.prompt_targets, k)
        row = 0
        for i, first, n in inputs.prompt_spans:
            seq = batch.seqs[i]
            top_k = seq.params.prompt_logprobs or 0
            chunk = scored[row : row + n]
            for lp in chunk:
                del lp.top[top_k:]
            seq.prompt_logprobs[first - 1 :] = chunk  # entry j scores token j + 1
            row += n
        return logits

    # --- async scheduling: decode steps launched ahead of the host (LLMEngine, --async-scheduling) ---

    @torch.inference_mode()
    def launch_decode(self, batch: ScheduledBatch, prev: LaunchedDecode | None = None,
                      prev_rows: list[int] | None = None) -> LaunchedDecode:
        """Queue a decode step (every sequence one token, every one sampling, no logprobs) and the
        copy of its tokens to the host, without waiting. With `prev`, each sequence computes the
        position after its host-side tokens, fed the token `prev` sampled for it (row prev_rows[i]
        of prev's batch): the step runs while the host has not seen that token yet."""
        lookahead = None
        if prev is not None:
            assert prev_rows is not None
            lookahead = prev.tokens.index_select(0, self._tensor(prev_rows))
        logits = self._replay_decode(batch, lookahead)
        timing = self._timing
        if logits is None:
            inputs = self.prepare(batch, lookahead)
            hidden = self._forward(inputs)
            timing = self._timing
            logits = self.model.compute_logits(hidden, inputs.adapters)  # decode: every token samples
        tokens, _ = self.sampler(logits, batch.seqs)
        # The step's forward time is read once its tokens are (finish_decode), not now.
        cpu_seconds, self._timing, self._cpu_forward_seconds = self._cpu_forward_seconds, None, None
        if tokens.device.type != "cuda":
            return LaunchedDecode(batch, tokens, tokens, None, timing, cpu_seconds)
        host, ready = self._copy_to_host(tokens)
        return LaunchedDecode(batch, tokens, host, ready, timing, cpu_seconds)

    def finish_decode(self, launched: LaunchedDecode) -> list[int]:
        """Wait for a launched step's tokens (releasing the GIL) and return them in batch order."""
        if launched.ready is not None:
            launched.ready.synchronize()
        self._timing, self._cpu_forward_seconds = launched.timing, launched.cpu_seconds
        return launched.host.tolist()

    def _to_host(self, tokens: torch.Tensor) -> list[int]:
        if tokens.device.type != "cuda":
            return tokens.tolist()
        host, ready = self._copy_to_host(tokens)
        ready.synchronize()  # releases the GIL while it waits
        return host.tolist()

    def _copy_to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Queue the copy of sampled tokens into a pinned buffer; the event is recorded after it.
        Two buffers, alternating: a step launched ahead may not have been read when the next copies."""
        self._turn ^= 1
        n = tokens.numel()
        host, ready = self._host_tokens[self._turn]
        if host is None or host.numel() < n:
            host, ready = torch.empty(max(n, 256), dtype=tokens.dtype, pin_memory=True), torch.cuda.Event()
            self._host_tokens[self._turn] = (host, ready)
        assert ready is not None
        host = host[:n]
        host.copy_(tokens, non_blocking=True)
        ready.record()
        return host, ready
