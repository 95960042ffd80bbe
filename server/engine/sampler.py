"""Turns the logits of the sequences that reached their last token into next tokens.

Order (as in vLLM): logit bias and min_tokens masking, penalties, the grammar mask of constrained
requests, then greedy argmax or temperature, top-k / top-p / min-p and a draw. The draw uses the
exponential trick (argmax of p / q with q ~ Exp(1)) so that no host sync is needed; a seeded request
draws q from its own generator, so its output does not depend on what else is in the batch.

Everything a request's own state can make fail (its generator's seed, its grammar, its logit bias)
is prepared for every row before anything is drawn: SequenceError names the requests that failed,
and the engine runs the step again without them, each seeded generator as it was.

Grammar masks are computed on the host from tokens the host already has (the previous step's), so on
a GPU they overlap the forward pass that was just queued; rows of free requests allow every token and
their logits are left bit for bit as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from sloth_kernels.sampling import sample

from .device import to_device
from .failures import SequenceError, describe, is_device_fault, is_out_of_memory
from .grammar import GrammarCompiler, GrammarMatchers, allowed_tokens, make_compiler
from .sequence import Sequence, TokenLogprob

logger = logging.getLogger(__name__)


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.grammar: GrammarCompiler | None = None  # set once the tokenizer is known
        self.grammar_error: str | None = None  # why the tokenizer has no grammar compiler
        self.use_triton = False  # --sampler triton: sloth_kernels.triton_sampling on CUDA
        self.matchers = GrammarMatchers()
        self._staging: torch.Tensor | None = None  # pinned host rows the bitmask is copied from

    def set_tokenizer(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        """Give the grammar compiler the vocabulary (the model's vocab_size: the mask's width). A
        tokenizer the grammar engine cannot read leaves structured outputs off, not the server down."""
        self.grammar, self.grammar_error = make_compiler(tokenizer, vocab_size, eos_token_ids)

    def _tensor(self, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
        return to_device(values, self.device, dtype)

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self.matchers.release(request_id)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [B, V] float32 -> (tokens [B], raw log-probs [B, V] or None when nobody asked).
        SequenceError (nothing drawn) when some rows' own state cannot be prepared."""
        failures: dict[str, str] = {}
        allowed = self._allowed(seqs, logits.shape[-1], failures)
        processed = self._process(logits, seqs, failures)
        generators = self._generators(seqs, failures)
        if failures:
            raise SequenceError(failures)
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = processed
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        # Decisions are taken from the host-side parameters, never from device values (no sync).
        is_greedy = [s.params.is_greedy for s in seqs]
        tokens = logits.argmax(dim=-1)
        if not all(is_greedy):
            greedy = self._tensor(is_greedy)
            tokens = torch.where(greedy, tokens, self._draw(logits, seqs, generators))
        return tokens, raw_logprobs

    def _generators(self, seqs: list[Sequence], failures: dict[str, str]) -> list[torch.Generator | None]:
        """Each row's own generator (seeded, sampling requests), made before its first draw."""
        out: list[torch.Generator | None] = []
        for seq in seqs:
            seed = seq.params.seed
            gen = None
            if seed is not None and not seq.params.is_greedy:
                gen = self.generators.get(seq.request_id)
                if gen is None:
                    try:
                        gen = torch.Generator(device=self.device).manual_seed(seed)
                    except (ValueError, RuntimeError, OverflowError, TypeError) as exc:
                        failures[seq.request_id] = f"seed {seed!r} cannot seed a generator ({describe(exc)})"
                        out.append(None)
                        continue
                    self.generators[seq.request_id] = gen
            out.append(gen)
        return out

    def _allowed(self, seqs: list[Sequence], vocab_size: int, failures: dict[str, str] | None = None,
                 with_drafts: bool = False) -> torch.Tensor | None:
        """bool [B, V]: the tokens each sequence's grammar allows next; None when none is constrained.
        Sequences whose grammar failed are added to `failures` (their rows allow their stop tokens).
        `with_drafts`: 1 + k rows per sequence with k draft tokens, row j after its first j drafts."""
        # Logits wider than the grammar's vocabulary (an adapter's added tokens in the batch): the
        # grammar masks its own width; past it constrained rows allow nothing, free rows everything.
        grammar_vocab = min(vocab_size, self.grammar.vocab_size) if self.grammar is not None else vocab_size
        bitmask = self.matchers.fill(seqs, self.grammar, grammar_vocab, with_drafts)
        if bitmask is None:
            return None
        if with_drafts:
            seqs = [seq for seq in seqs for _ in range(1 + len(seq.spec_token_ids))]
        for seq in seqs:
            error = self.matchers.error(seq.request_id) if seq.params.structured is not None else None
            if error is not None and failures is not None:
                failures[seq.request_id] = error
        if self.device.type == "cuda":
            # A verify step's rows are masked after the plain rows of the same step, whose copy may
            # still read the pinned buffer: they are copied from pageable memory instead.
            bitmask = bitmask.to(self.device) if with_drafts else self._to_device(bitmask)
        allowed = allowed_tokens(bitmask, grammar_vocab)
        return allowed if grammar_vocab == vocab_size else self._widen(allowed, seqs, vocab_size)

    def _widen(self, allowed: torch.Tensor, seqs: list[Sequence], vocab_size: int) -> torch.Tensor:
        free = self._tensor([s.params.structured is None for s in seqs]).unsqueeze(1)
        return torch.cat([allowed, free.expand(-1, vocab_size - allowed.shape[1])], dim=1)

    def _to_device(self, bitmask: torch.Tensor) -> torch.Tensor:
        """Copy through one pinned buffer (pinning per step costs more than the mask). Reusing it is
        safe: the previous step's copy finished before that step's tokens reached the host."""
        rows, width = bitmask.shape
        if self._staging is None or self._staging.shape[0] < rows or self._staging.shape[1] != width:
            self._staging = torch.empty((max(rows, 64), width), dtype=bitmask.dtype).pin_memory()
        staged = self._staging[:rows]
        staged.copy_(bitmask)
        return staged.to(self.device, non_blocking=True)

    def _process(self, logits: torch.Tensor, seqs: list[Sequence], failures: dict[str, str]) -> torch.Tensor:
        needs = [bool(s.params.logit_bias) or s.num_output_tokens < s.params.min_tokens or s.params.has_penalties for s in seqs]
        if not any(needs):
            return logits
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            if not needs[i]:
                continue
            try:
                self._process_row(logits[i], seq)
            except (ValueError, RuntimeError, IndexError, TypeError, OverflowError) as exc:
                if is_device_fault(exc) or is_out_of_memory(exc):
                    raise
                failures[seq.request_id] = f"its sampling parameters cannot be applied ({describe(exc)})"
        return logits

    def _process_row(self, row: torch.Tensor, seq: Sequence) -> None:
        """Logit bias, min_tokens and penalties on one row, in place."""
        p = seq.params
        vocab = row.shape[-1]
        if p.logit_bias:
            row.index_add_(0, self._tensor(list(p.logit_bias.keys())),
                           self._tensor(list(p.logit_bias.values()), row.dtype))
        if seq.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(seq.eos_token_ids))
            if banned:  # index_fill_, not row[ids] = -inf: that copies the scalar from pageable memory (a sync)
                row.index_fill_(0, self._tensor(sorted(banned)), float("-inf"))
        if p.repetition_penalty != 1.0:  # (a prompt token past the logits, Llama 3.2 Vision's <|image|>, has none)
            seen = self._tensor(sorted(t for t in set(seq.token_ids) if t < vocab))
            vals = row.index_select(0, seen)
            row.index_copy_(0, seen, torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty))
        if (p.frequency_penalty or p.presence_penalty) and seq.num_output_tokens:
            out = self._tensor(seq.output_token_ids)
            # scatter_add, not bincount: bincount reads the largest id back to the host (a sync).
            counts = torch.zeros(vocab, dtype=row.dtype, device=row.device).scatter_add_(
                0, out, torch.ones(out.shape, dtype=row.dtype, device=row.device))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator | None]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p and the exponential race (sloth_kernels.sampling: the PyTorch
        reference, or the Triton kernel on CUDA with --sampler triton). The noise is drawn here, from each seeded request's own
        generator, so a seed gives the same tokens with either implementation."""
        vocab = logits.shape[-1]
        k_list = [min(s.params.top_k, vocab) if s.params.top_k > 0 else vocab for s in seqs]
        p_list = [s.params.top_p for s in seqs]
        min_p_list = [s.params.min_p for s in seqs]
        temperature = self._tensor([s.params.temperature or 1.0 for s in seqs])
        top_k = self._tensor(k_list)
        top_p = self._tensor(p_list)
        min_p = self._tensor(min_p_list)
        q = torch.empty_like(logits, dtype=torch.float32).exponential_()
        for i, gen in enumerate(generators):
            if gen is not None:
                q[i].exponential_(generator=gen)
        cut = any(k < vocab for k in k_list) or any(p < 1 for p in p_list)
        return sample(logits.float(), temperature, top_k, top_p, min_p, q, cut, any(m > 0 for m in min_p_list),
                      self.use_triton)


def gather_logprobs(
    raw_logprobs: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
) -> list[TokenLogprob | None]:
    """Log-probabilities of the chosen tokens and of each request's top-k, in one host copy."""
    k = max(s.params.logprobs or 0 for s in seqs)
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top_vals, top_ids = raw_logprobs.topk(max(k, 1), dim=-1)
    chosen_l, top_vals_l, top_ids_l, tokens_l = (
        chosen.tolist(), top_vals.tolist(), top_ids.tolist(), tokens.tolist()
    )
    result: list[TokenLogprob | None] = []
    for i, seq in enumerate(seqs):
        n = seq.params.logprobs
        if n is None:
            result.append(None)
            continue
        top = list(zip(top_ids_l[i][:n], top_vals_l[i][:n], strict=True))
        result.append(TokenLogprob(tokens_l[i], chosen_l[i], top))
    return result


# Rows of prompt logits turned into log-probabilities at a time: bounds the float32 copies of a
# long chunk's [rows, vocab] logits.
_PROMPT_ROWS_PER_PASS = 1024


def gather_prompt_logprobs(logits_of: Callable[[int, int], torch.Tensor], num_rows: int, targets: torch.Tensor,
                           k: int) -> list[TokenLogprob]:
    """Each scored row's log-probability (float32 log_softmax) of its target token, that token's rank,
    and the row's top-k, in one host copy. `logits_of(a, b)`: the logits of rows [a, b). A prompt
    token past the logits (Llama 3.2 Vision's <|image|>, which the model never predicts) scores -inf,
    ranked after every token that has a logit."""
    columns = []
    for start in range(0, num_rows, _PROMPT_ROWS_PER_PASS):
        lp = torch.log_softmax(logits_of(start, min(start + _PROMPT_ROWS_PER_PASS, num_rows)).float(), dim=-1)
        target = targets[start : start + _PROMPT_ROWS_PER_PASS].unsqueeze(1)
        inside = target < lp.shape[1]
        picked = lp.gather(1, torch.where(inside, target, 0)).masked_fill(~inside, float("-inf"))
        vals, ids = lp.topk(max(k, 1), dim=-1)
        # Token ids and ranks travel as float64 beside the log-probabilities: exact.
        columns.append(torch.cat([target.double(), picked.double(), ((lp > picked).sum(dim=1, keepdim=True) + 1).double(),
                                  vals[:, :k].double(), ids[:, :k].double()], dim=1))
    rows = torch.cat(columns).cpu().tolist()
    return [
        TokenLogprob(int(row[0]), row[1], [(int(t), v) for t, v in zip(row[3 + k :], row[3 : 3 + k], strict=True)],
                     int(row[2]))
        for row in rows
    ]
