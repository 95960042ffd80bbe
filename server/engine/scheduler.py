"""Continuous batching: every step picks running and waiting sequences under a token budget.

There is no prefill or decode phase (as in vLLM v1): each scheduled sequence gets a number of new
tokens to compute, one for a decoding sequence, up to the remaining budget for a prompt (so long
prompts are prefilled in chunks across steps; with `whole_images`, a chunk never ends inside an
image, whose tokens attend to each other both ways). When KV blocks run out the newest running sequence
is preempted, its blocks freed, and it is recomputed later from its tokens.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request_fit import fit_error
from .sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from .spec_decode.stats import SpecStats


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_loras: int = 4  # distinct adapters in one step
    # Prompt tokens (prefill chunks) in one step while some sequence decodes: every decoding stream
    # waits for the whole step, so a 2,048-token chunk stalls each of them by a long prefill's time.
    # A step with no sequence decoding, or with more requests waiting for their prompts than
    # sequences decoding (Scheduler._bound_prompts), takes prompts up to max_num_batched_tokens.
    max_prefill_tokens_while_decoding: int = 512
    # A prompt chunk never ends inside an image (Gemma 3: an image's tokens attend to each other
    # both ways, so its last token's keys must be computed in the same step as its first query).
    whole_images: bool = False

    def __post_init__(self) -> None:
        if (self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_model_len < 2
                or self.max_prefill_tokens_while_decoding < 1):
            raise ValueError(f"invalid scheduler limits: {self}")


@dataclass(slots=True)
class ScheduledBatch:
    """What one step computes: `seqs[i]` runs `num_new_tokens[i]` tokens from its num_computed_tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token (and its draft tokens, when it speculates)
        this step, so its logits give new tokens."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens + len(seq.spec_token_ids)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.finished_unscheduled: list[Sequence] = []  # ended by schedule() itself; the engine reports them
        self.spec_stats = SpecStats()  # speculative decoding: drafts verified and accepted

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_fits(self, seq: Sequence) -> None:
        """Reject at admission what could never run, with a message the caller can act on."""
        # At least one new token (the engine ends a longer one at max_model_len), none for a prompt
        # only scored (max_tokens 0 with prompt_logprobs: a prompt of max_model_len tokens fits).
        bm = self.block_manager
        why = fit_error(seq.num_tokens, min(seq.params.max_tokens, 1), self.config.max_model_len,
                        bm.num_blocks * bm.block_size)
        if why is not None:
            raise ValueError(why)
        cross = bm.cross_kv
        if cross is not None and cross.bytes_for(seq) > cross.num_bytes:
            raise ValueError(f"the cross-attention keys and values of {len(seq.mm.images)} images "  # type: ignore[union-attr]
                             f"({cross.bytes_for(seq) / 2**20:.0f} MiB) exceed the {cross.num_bytes / 2**20:.0f} MiB "
                             "kept for them: send fewer images in one request")
        budget = self.config.max_num_batched_tokens
        if self.config.whole_images and seq.mm is not None and any(i.num_tokens > budget for i in seq.mm.images):
            most = max(i.num_tokens for i in seq.mm.images)
            raise ValueError(f"an image of {most} tokens does not fit one step of --max-num-batched-tokens {budget}: "
                             "this model computes each image's tokens in one step; raise it")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Sequence | None:
        """End a request early. `reason` is what its client saw (STOP for a stop string)."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, reason)
                    return seq
        return None

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        # Prompt tokens this step may take: bounded while a sequence decodes (it waits for the step).
        prefill_budget = budget
        if self._bound_prompts():
            prefill_budget = min(budget, self.config.max_prefill_tokens_while_decoding)
        adapters: set[int] = set()
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            prefilling = not self._is_decoding(seq)
            if prefilling and prefill_budget <= 0:
                i += 1  # its next chunk waits for a step with prompt budget left; the decodes go on
                continue
            num_new = self._num_new_running(seq, min(budget, prefill_budget) if prefilling else budget)
            num_new = self._cap_at_snapshot(seq, seq.num_computed_tokens, num_new)
            num_new = self._cap_at_image(seq, seq.num_computed_tokens, num_new, budget)
            if num_new == 0:  # its next image does not fit what is left of this step's budget
                i += 1
                continue
            while not self.block_manager.allocate_slots(seq, num_new):
                if seq.spec_token_ids:  # its draft tokens give way before any sequence does
                    num_new -= len(seq.spec_token_ids)
                    seq.spec_token_ids.clear()
                    continue
                victim = self.running.pop()  # the newest running sequence gives way
                self._preempt(victim, batch)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                adapters.add(seq.adapter_id)
                budget -= num_new
                if prefilling:
                    prefill_budget -= num_new
                i += 1
                continue
            break  # `seq` itself was preempted: nothing after it is running any more
        if not preempted:
            self._admit_waiting(batch, min(budget, prefill_budget), adapters, budget)
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        return self._decodes_first(batch)

    def _bound_prompts(self) -> bool:
        """Whether this step's prompt tokens are bounded by max_prefill_tokens_while_decoding: some
        sequence decodes, and no more requests wait for their prompts (waiting, or prefilling in
        chunks) than sequences decode. The bound spreads the prompts' work over steps so that each
        decoding stream's pause stays short; when more requests wait than streams would pause (a
        burst of arrivals beside a few streams: 64 requests sent at once reach the engine one after
        another, and the first starts decoding alone), holding them back costs more waiting than it
        spares, and a step takes prompts up to max_num_batched_tokens as an idle engine does. Only
        the waiting requests that free sequence and LoRA slots could admit count: under overload
        (every slot taken, a queue behind) lifting the bound would admit none of the queue and only
        lengthen the running prompts' chunks, pausing every stream for them."""
        decoding = sum(1 for seq in self.running if self._is_decoding(seq))
        if not decoding:
            return False
        admissible = self._num_admissible(max(self.config.max_num_seqs - len(self.running), 0))
        held = admissible + len(self.running) - decoding
        return held <= decoding

    def _num_admissible(self, slots: int) -> int:
        """How many of the first waiting requests `slots` free sequence slots could admit in order,
        beside the running sequences' adapters (the queue is admitted first come, first served)."""
        adapters = {seq.adapter_id for seq in self.running}
        count = 0
        for seq in itertools.islice(self.waiting, slots):
            if self._needs_adapter_slot(seq, adapters):
                break
            adapters.add(seq.adapter_id)
            count += 1
        return count

    @staticmethod
    def _is_decoding(seq: Sequence) -> bool:
        """Whether the sequence's prompt is computed (it samples a token, or verifies drafts, every
        step): a prompt chunk, or a preempted sequence recomputing its tokens, is a prefill."""
        return seq.num_uncomputed_tokens <= 1 and seq.num_output_tokens > 0

    @staticmethod
    def _num_new_running(seq: Sequence, budget: int) -> int:
        """Tokens a running sequence computes: what is left of it plus its draft tokens (trimmed
        to the step's token budget)."""
        num_new = min(seq.num_uncomputed_tokens + len(seq.spec_token_ids), budget)
        if seq.spec_token_ids:
            del seq.spec_token_ids[max(num_new - seq.num_uncomputed_tokens, 0) :]
        return num_new

    def _cap_at_snapshot(self, seq: Sequence, start: int, num_new: int) -> int:
        """Models with recurrent layers: a prompt chunk stops where the state is snapshotted."""
        snaps = self.block_manager.snapshots
        if snaps is None or not self.block_manager.enable_prefix_caching:
            return num_new
        return snaps.cap(seq, start, num_new)

    def _cap_at_image(self, seq: Sequence, start: int, num_new: int, room: int) -> int:
        """With whole_images: a chunk from `start` that would end inside an image stops before it;
        one that starts at (or in) that image takes all of it when the step has `room` for it (even
        past the prompt bound beside decodes, which could otherwise be smaller than an image and
        hold it back for good), else computes nothing this step. A chunk may start inside an image:
        its first tokens came from the prefix cache, computed whole by another prompt. The wait ends:
        `room` is the step's budget less what sequences older than this one took (newer ones, running
        after it or still waiting behind it, take theirs later), and the older ones only end."""
        if not self.config.whole_images or seq.mm is None:
            return num_new
        end = start + num_new
        for img in seq.mm.images:
            image_end = img.offset + img.num_tokens
            if img.offset < end < image_end:
                if img.offset > start:
                    return img.offset - start
                return image_end - start if image_end - start <= room else 0
        return num_new

    @staticmethod
    def _decodes_first(batch: ScheduledBatch) -> ScheduledBatch:
        """Put single-token sequences first: attention runs them through its decode kernel."""
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)
        batch.seqs = [batch.seqs[i] for i in order]
        batch.num_new_tokens = [batch.num_new_tokens[i] for i in order]
        return batch

    def could_admit(self) -> bool:
        """Whether the next schedule() might start the first waiting sequence beside the running
        decodes. False only where it certainly could not: no sequence slot, no token budget left
        after one token per running sequence, no prompt budget left beside the decodes after the
        running prompts' chunks, or no adapter slot for it (free KV blocks are not
        judged here: a prefix-cache hit can make room)."""
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return False
        if self.config.max_num_batched_tokens <= len(self.running):
            return False
        if self._bound_prompts():  # the prompt budget beside decodes
            prompts = sum(seq.num_uncomputed_tokens for seq in self.running if not self._is_decoding(seq))
            if prompts >= self.config.max_prefill_tokens_while_decoding:
                return False
        return not self._needs_adapter_slot(self.waiting[0], {s.adapter_id for s in self.running})

    def _admit_waiting(self, batch: ScheduledBatch, budget: int, adapters: set[int], room: int) -> None:
        """`budget`: prompt tokens the step may still take; `room`: tokens at all (an image may
        exceed the former, see _cap_at_image)."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if bm.num_blocks_for(seq.num_tokens) > bm.num_blocks:
                # Preempted after outgrowing the whole cache: recomputed in chunks, it would be
                # preempted again at its last token, step after step. It ends where it got to.
                self.waiting.popleft()
                self._finish(seq, FinishReason.LENGTH)
                self.finished_unscheduled.append(seq)
                continue
            if self._needs_adapter_slot(seq, adapters):
                break
            # A request for prompt logprobs computes every prompt position: a cached prefix would
            # skip the positions whose logits it needs, so it does not look the cache up.
            wants_all = seq.params.prompt_logprobs is not None
            cached = bm.find_cached_blocks(seq) if not seq.block_table and not wants_all else []
            num_new = min(seq.num_uncomputed_tokens - len(cached) * bm.block_size, budget)
            start = seq.num_computed_tokens + len(cached) * bm.block_size
            num_new = self._cap_at_image(seq, start, self._cap_at_snapshot(seq, start, num_new), room)
            if num_new == 0:  # its first image does not fit what is left of this step's budget
                break
            if not bm.allocate_slots(seq, num_new, cached):
                if not self.running and not batch.seqs:
                    # Alone and still too big for the whole cache: it can never run.
                    self.waiting.popleft()
                    self._finish(seq, FinishReason.LENGTH)
                    self.finished_unscheduled.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            adapters.add(seq.adapter_id)
            budget -= num_new
            room -= num_new

    def _needs_adapter_slot(self, seq: Sequence, adapters: set[int]) -> bool:
        """Whether seq's adapter is not among the step's `adapters` and every LoRA slot is taken."""
        return bool(seq.adapter_id) and seq.adapter_id not in adapters and len(adapters - {0}) >= self.config.max_loras

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.num_draft_computed = 0  # the draft's KV lived in the freed blocks
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.num_preempted += 1
        self.waiting.appendleft(seq)

    def postprocess(
        self,
        batch: ScheduledBatch,
        sampled: list[int | None],
        logprobs: list[TokenLogprob | None] | None = None,
    ) -> list[Sequence]:
        """Advance every scheduled sequence; append sampled tokens (after the draft tokens the step
        accepted, for a speculating sequence); finish those that stop, at the first token that stops
        them. Returns the sequences that got new tokens (finished ones included), and those with
        max_tokens 0 whose prompt is done (finished, without a token)."""
        updated: list[Sequence] = []
        now = time.monotonic()
        for i, seq in enumerate(batch.seqs):
            num_spec = len(seq.spec_token_ids)
            accepted, accepted_logprobs = self._settle_drafts(seq, batch.num_new_tokens[i])
            token = sampled[i]
            if token is None or seq.is_finished:
                self.block_manager.register_computed_blocks(seq)
                continue
            if seq.params.max_tokens == 0:  # the prompt was only scored (prompt_logprobs)
                self.block_manager.register_computed_blocks(seq)
                self.running.remove(seq)
                self._finish(seq, FinishReason.LENGTH)
                updated.append(seq)
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            lps: list[TokenLogprob | None] = [*accepted_logprobs] if accepted_logprobs else [None] * len(accepted)
            lps.append(logprobs[i] if logprobs is not None else None)
            for new_token, lp in zip([*accepted, token], lps, strict=True):
                seq.append_token(new_token)
                if lp is not None:
                    seq.logprobs.append(lp)
                reason = self._stop_reason(seq, new_token)
                if reason is not None:
                    self.running.remove(seq)
                    self._finish(seq, reason)
                    break
            else:
                self.block_manager.register_computed_blocks(seq)
                if num_spec or len(seq.block_table) > self.block_manager.num_blocks_for(seq.num_tokens):
                    self.block_manager.trim(seq, seq.num_tokens)  # blocks only rejected drafts used
            updated.append(seq)
        return updated

    def _settle_drafts(self, seq: Sequence, num_new: int) -> tuple[list[int], list[TokenLogprob]]:
        """Count the computed positions of a step: the rejected draft tokens' positions are not
        (their KV slots are overwritten later). Returns the accepted drafts and their logprobs."""
        num_spec = len(seq.spec_token_ids)
        if not num_spec:
            seq.num_computed_tokens += num_new
            return [], []
        accepted = seq.spec_token_ids[: seq.num_spec_accepted]
        accepted_logprobs = seq.spec_logprobs[: len(accepted)]
        seq.num_computed_tokens += num_new - (num_spec - len(accepted))
        self.spec_stats.observe(num_spec, len(accepted))
        seq.spec_token_ids, seq.num_spec_accepted, seq.spec_logprobs = [], 0, []
        return accepted, accepted_logprobs

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in seq.eos_token_ids:
                return FinishReason.STOP
            if token in params.stop_token_ids:
                seq.stop_token_id = token
                return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish_running(self, reason: FinishReason) -> list[Sequence]:
        seqs = list(self.running)
        self.running.clear()
        for seq in seqs:
            self._finish(seq, reason)
        return seqs

    def finish_all(self, reason: FinishReason) -> list[Sequence]:
        """End every sequence (engine failure or shutdown); returns them."""
        seqs = [*self.running, *self.waiting]
        self.running.clear()
        self.waiting.clear()
        for seq in seqs:
            self._finish(seq, reason)
        return seqs

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
