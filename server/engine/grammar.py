"""Grammar-constrained decoding: a structured-output spec compiled against the tokenizer's vocabulary,
one grammar matcher per request, and each step's allowed-token bitmask for the batch.

The library is llguidance, chosen over xgrammar by measurement (bench/structured.py; numbers in
bench/results/structured.md, 2-core CPU, vocabularies of 4096 and 32000 tokens). xgrammar fills a
mask 5-10x faster (1.5-15 us a row against 15-115 us), but its masks are not exact: it let raw control
characters and non-UTF-8 bytes into `maxLength` strings and refused valid escapes there, and it
silently ignores keywords it cannot enforce (uniqueItems, contains, if/then, dependentRequired; oneOf
becomes anyOf), so outputs failed their schema. llguidance was exact on every case and names the
keywords it cannot enforce, which the API returns as a 400. Its host cost overlaps the GPU's forward
pass (the mask is computed while the step's kernels run) and its executor fills rows in parallel.

Ownership: the compiler is shared (the API compiles off the engine thread, the cache is locked); a
matcher is created, advanced and dropped by the engine thread only.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

    from .sampling_params import StructuredSpec
    from .sequence import Sequence

logger = logging.getLogger(__name__)

# No free whitespace: a weak model at temperature 1 could emit whitespace forever; with fixed
# separators (those of json.dumps) it has nothing to wander in between values.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
}


class GrammarError(ValueError):
    """The spec cannot be compiled; the message says why (llguidance's own words)."""


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bitmask [B, ceil(V / 32)] int32 (bit j of word w: token 32 w + j may come next) -> bool [B, V]."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]


class GrammarCompiler:
    """The tokenizer's vocabulary as llguidance sees it, and a cache of compiled grammars. A compiled
    grammar is a matcher that never advances: requests start from a copy of it (microseconds), and the
    copies share its lexer, which the first mask of the compiled template already built."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int], cache_size: int = 256
    ) -> None:
        eos = sorted(eos_token_ids) or None  # None: the tokenizer's own EOS
        self.vocab_size = vocab_size
        # A tokenizer may hold ids past the logits (Llama 3.2 Vision's <|image|>): the grammar engine
        # reads every one of them, and the mask's columns past the logits are dropped (never sampled).
        self.mask_vocab_size = max(vocab_size, len(tokenizer))
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.mask_vocab_size, eos_token=eos)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredSpec) -> llguidance.LLMatcher:
        """The compiled grammar of `spec`; GrammarError names what is wrong with it."""
        with self._lock:
            template = self._cache.get(spec.key)
            if template is not None:
                self._cache.move_to_end(spec.key)
                return template
        template = self._build(spec)  # outside the lock: compiling can take milliseconds
        with self._lock:
            self._cache[spec.key] = template
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return template

    def _build(self, spec: StructuredSpec) -> llguidance.LLMatcher:
        try:
            if spec.kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(spec.json_schema)
            elif spec.kind == "lark":
                grammar = llguidance.LLMatcher.grammar_from_lark(spec.json_schema)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        # Builds the lexer states of the first position now, off the engine thread.
        template.compute_bitmask()
        return template


def make_compiler(tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> tuple[GrammarCompiler | None, str | None]:
    """The tokenizer's compiler, or None and why: a tokenizer the grammar engine cannot read leaves
    structured outputs off, not the server down."""
    try:
        return GrammarCompiler(tokenizer, vocab_size, eos_token_ids), None
    except Exception as exc:  # llguidance raises ValueError / RuntimeError on tokenizers it cannot map
        error = f"the model's tokenizer is not supported by the grammar engine ({exc})"
        logger.warning("structured outputs disabled: %s", error)
        return None, error


@dataclass(slots=True)
class _Match:
    matcher: llguidance.LLMatcher | None  # None: no grammar could be made (failed)
    num_accepted: int = 0  # output tokens the matcher has consumed
    error: str | None = None  # why the request cannot go on under its grammar

    @property
    def failed(self) -> bool:
        return self.error is not None


class GrammarMatchers:
    """The grammar state of every constrained request, keyed by request id. Each step it first feeds
    each matcher the tokens its sequence gained since the last step (a preempted sequence keeps its
    tokens, so nothing is fed twice), then fills the batch's mask rows in one parallel call."""

    def __init__(self, num_threads: int | None = None) -> None:
        self.executor = llguidance.LLExecutor(num_threads)
        self.matches: dict[str, _Match] = {}

    def __len__(self) -> int:
        return len(self.matches)

    def release(self, request_id: str) -> None:
        self.matches.pop(request_id, None)

    def error(self, request_id: str) -> str | None:
        """Why the request's grammar failed (its request must end with an error), or None."""
        match = self.matches.get(request_id)
        return None if match is None else match.error

    def fill(self, seqs: list[Sequence], compiler: GrammarCompiler | None, vocab_size: int,
             with_drafts: bool = False) -> torch.Tensor | None:
        """The batch's bitmask [rows, ceil(V / 32)] on the host (V: the compiler's mask vocabulary, at
        least `vocab_size`; rows of free sequences allow every token), or None when no sequence in the batch is constrained. A row per sequence; with
        `with_drafts`, 1 + k rows per sequence with k draft tokens (speculative decoding): row j
        holds what the grammar allows after the sequence's tokens and its first j drafts."""
        counts = [1 + len(seq.spec_token_ids) if with_drafts else 1 for seq in seqs]
        starts = [0, *itertools.accumulate(counts)][:-1]
        rows = [i for i, seq in enumerate(seqs) if seq.params.structured is not None]
        if not rows:
            return None
        mask_vocab = max(vocab_size, compiler.mask_vocab_size) if compiler is not None else vocab_size
        bitmask = torch.full((sum(counts), bitmask_width(mask_vocab)), -1, dtype=torch.int32)
        pairs = [(self._advance(seqs[i], compiler), i) for i in rows]
        live = [(match.matcher, i) for match, i in pairs if match.matcher is not None and not match.failed]
        if live and with_drafts:
            # The library advances each matcher through its drafts and rolls it back (it stays at the
            # sequence's tokens); it leaves the rows after a forbidden draft unwritten.
            llguidance.torch.fill_next_token_bitmask_par_with_draft_tokens(
                self.executor, [(m, starts[i], seqs[i].spec_token_ids) for m, i in live], bitmask)
            for m, i in live:
                valid = m.validate_tokens(seqs[i].spec_token_ids)
                if valid < counts[i] - 1:  # never read (its draft is rejected): a copy, not a mask of nothing
                    bitmask[starts[i] + valid + 1 : starts[i] + counts[i]] = bitmask[starts[i] + valid]
        elif live:
            llguidance.torch.fill_next_token_bitmask_par(self.executor, [(m, starts[i]) for m, i in live], bitmask)
        for match, i in pairs:
            if match.matcher is not None and not match.failed and match.matcher.is_error():  # e.g. a parser limit
                self._fail(seqs[i], match, "the grammar matcher failed")
            if match.failed:  # end the request: its stop tokens only
                seq = seqs[i]
                bitmask[starts[i] : starts[i] + counts[i]] = _only(seq.eos_token_ids | set(seq.params.stop_token_ids),
                                                                   bitmask.shape[1])
        return bitmask

    def num_valid_drafts(self, seq: Sequence, compiler: GrammarCompiler | None) -> int:
        """How many of the sequence's draft tokens its grammar allows in a row after its tokens (the
        matcher first fed the tokens it gained, as a step's mask does; it is not advanced past them)."""
        match = self._advance(seq, compiler)
        if match.matcher is None or match.failed:
            return 0
        return match.matcher.validate_tokens(seq.spec_token_ids)

    def _advance(self, seq: Sequence, compiler: GrammarCompiler | None) -> _Match:
        match = self.matches.get(seq.request_id)
        if match is None:
            match = self.matches[seq.request_id] = self._new_match(seq, compiler)
        new = seq.token_ids[seq.num_prompt_tokens + match.num_accepted :]
        if new and match.matcher is not None and not match.failed:
            match.num_accepted += len(new)
            why = f"the grammar rejected token(s) {new}"  # cannot happen while masks are exact
            try:
                accepted = match.matcher.consume_tokens(new)
            except Exception as exc:  # the library failing on this request: its failure, not the batch's
                accepted, why = False, f"the grammar matcher raised {type(exc).__name__}: {exc}"
            if not accepted:
                self._fail(seq, match, why)
        return match

    @staticmethod
    def _fail(seq: Sequence, match: _Match, what: str) -> None:
        """End the request rather than the engine (the sampler reports `match.error` as the
        request's error); meanwhile its row allows its stop tokens only."""
        detail = match.matcher.get_error() if match.matcher is not None else ""
        logger.error("request %s: %s %s; ending it", seq.request_id, what, detail)
        match.error = f"structured output failed: {what}" + (f" ({detail})" if detail else "")

    def _new_match(self, seq: Sequence, compiler: GrammarCompiler | None) -> _Match:
        """A copy of the compiled grammar; compiled here if the caller did not (the API always does,
        off this thread). A spec that cannot be compiled fails its request only."""
        spec = seq.params.structured
        assert spec is not None
        template = spec.compiled
        try:
            if template is None:
                if compiler is None:
                    raise GrammarError("the sampler has no tokenizer: call Sampler.set_tokenizer() at startup")
                template = compiler.compile(spec)
            return _Match(template.deep_copy())
        except Exception as exc:  # GrammarError, or the library failing on this spec: this request only
            match = _Match(None)
            self._fail(seq, match, f"the grammar cannot be used: {exc}")
            return match


def _only(token_ids: Iterable[int], width: int) -> torch.Tensor:
    row = torch.zeros(width * 32, dtype=torch.bool)
    row[sorted(token_ids)] = True
    weights = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int64)
    return (row.view(width, 32).long() * weights).sum(-1).to(torch.int32)
