"""Verifying draft tokens against the target's logits, exactly.

A speculating sequence brings 1 + k logit rows: row j scores the position after draft token j (row 0
after its last real token). Greedy requests accept draft token j while it is the target's argmax at
row j, then take the argmax of the first row that disagrees (or of the last row): the tokens plain
greedy decoding gives. Sampled requests use rejection sampling (Leviathan et al. 2023, Chen et al.
2023): draft token d at row j is accepted with probability min(1, p(d) / q(d)), where p is the
target's distribution after temperature / top-k / top-p / min-p and q the draft's (one-hot for n-gram
proposals); the first rejected row draws from norm(max(0, p - q)), and a step whose drafts are all
accepted draws a bonus token from the last row's p. Each emitted token is then distributed as p.

A constrained request's row j is masked by its grammar after its first j draft tokens (computed by
advancing its matcher through them and rolling it back): the mask plain decoding would apply had it
produced those tokens, so greedy outputs stay identical and p stays the constrained distribution. A
draft token the grammar forbids has p = 0 there and is rejected (the proposer cuts drafts at the
first such token, keeping it only where it was drawn from a draft model's q, whose rejection step
the residual needs). Requests with penalties or a pending min_tokens do not speculate (their logits
depend on the tokens before each row through more than a mask; see proposer.py): the rows verified
here get the logit bias, as one plain row would.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from sloth_kernels.sampling import filtered_probs

from ..failures import SequenceError
from ..sampler import Sampler, gather_logprobs
from ..sequence import Sequence, TokenLogprob


def sample_with_drafts(
    sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], draft_probs: Mapping[str, torch.Tensor],
) -> tuple[list[int], list[TokenLogprob | None] | None]:
    """logits: each sequence's rows in order (1 + len(spec_token_ids) each). Returns each sequence's
    last new token (after its accepted drafts) and that token's logprobs when asked; sets
    `num_spec_accepted` and `spec_logprobs` of the speculating ones."""
    counts = [1 + len(seq.spec_token_ids) for seq in seqs]
    starts = [0, *itertools.accumulate(counts)][:-1]
    plain = [i for i, seq in enumerate(seqs) if not seq.spec_token_ids]
    spec = [i for i, seq in enumerate(seqs) if seq.spec_token_ids]
    tokens: list[int] = [0] * len(seqs)
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    failures: dict[str, str] = {}
    plain_out = None
    if plain:
        try:
            plain_out = sampler(logits[[starts[i] for i in plain]], [seqs[i] for i in plain])
        except SequenceError as exc:
            failures.update(exc.failures)
    spec_rows = [starts[i] + j for i in spec for j in range(counts[i])]
    verified = _verify(sampler, logits[spec_rows], [seqs[i] for i in spec], draft_probs, failures)
    if plain_out is not None:
        plain_tokens, raw = plain_out
        plain_seqs = [seqs[i] for i in plain]
        for i, token in zip(plain, plain_tokens.tolist(), strict=True):
            tokens[i] = token
        if raw is not None:
            for i, lp in zip(plain, gather_logprobs(raw, plain_tokens, plain_seqs), strict=True):
                logprobs[i] = lp
    for i, (token, lp) in zip(spec, verified, strict=True):
        tokens[i], logprobs[i] = token, lp
    return tokens, (logprobs if any(lp is not None for lp in logprobs) else None)


def _verify(
    sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], draft_probs: Mapping[str, torch.Tensor],
    failures: dict[str, str],
) -> list[tuple[int, TokenLogprob | None]]:
    """Accept or reject the drafts of speculating sequences (their rows only, in order)."""
    rows = [seq for seq in seqs for _ in range(1 + len(seq.spec_token_ids))]
    allowed = sampler._allowed(seqs, logits.shape[-1], failures, with_drafts=True)  # row j: after j drafts
    processed = sampler._process(logits, rows, failures)  # logit bias, as the plain sampler applies it
    generators = sampler._generators(seqs, failures)
    if failures:
        raise SequenceError(failures)
    if not seqs:
        return []
    if allowed is not None:
        processed = processed.masked_fill(~allowed, float("-inf"))
    device = logits.device
    drafts = torch.tensor([t for seq in seqs for t in [*seq.spec_token_ids, 0]], device=device)
    greedy_rows = torch.tensor([seq.params.is_greedy for seq in rows], device=device)
    target = processed.argmax(dim=-1)
    accepted = target == drafts
    chosen = target
    if not all(seq.params.is_greedy for seq in seqs):
        s_accepted, s_chosen = _rejection_sample(processed, seqs, rows, drafts, draft_probs, generators)
        accepted = torch.where(greedy_rows, accepted, s_accepted)
        chosen = torch.where(greedy_rows, chosen, s_chosen)
    accepted_l, chosen_l = torch.stack([accepted.long(), chosen]).tolist()  # the step's one host copy
    results: list[tuple[int, TokenLogprob | None]] = []
    emitted_rows: list[int] = []
    emitted: list[int] = []
    row = 0
    for seq in seqs:
        k = len(seq.spec_token_ids)
        m = next((j for j in range(k) if not accepted_l[row + j]), k)
        seq.num_spec_accepted = m
        results.append((chosen_l[row + m], None))
        emitted_rows += range(row, row + m + 1)
        emitted += [*seq.spec_token_ids[:m], chosen_l[row + m]]
        row += k + 1
    if any(seq.params.logprobs is not None for seq in seqs):
        results = _attach_logprobs(logits, seqs, rows, emitted_rows, emitted, results)
    return results


def _attach_logprobs(
    logits: torch.Tensor, seqs: list[Sequence], rows: list[Sequence], emitted_rows: list[int], emitted: list[int],
    results: list[tuple[int, TokenLogprob | None]],
) -> list[tuple[int, TokenLogprob | None]]:
    """The target's raw log-probabilities (as the plain sampler reports them) of every emitted token."""
    raw = torch.log_softmax(logits[emitted_rows], dim=-1)
    lps = gather_logprobs(raw, torch.tensor(emitted, device=logits.device), [rows[r] for r in emitted_rows])
    out: list[tuple[int, TokenLogprob | None]] = []
    at = 0
    for seq, (token, _) in zip(seqs, results, strict=True):
        m = seq.num_spec_accepted
        seq.spec_logprobs = [lp for lp in lps[at : at + m] if lp is not None]
        out.append((token, lps[at + m]))
        at += m + 1
    return out


def _rejection_sample(
    processed: torch.Tensor, seqs: list[Sequence], rows: list[Sequence], drafts: torch.Tensor,
    draft_probs: Mapping[str, torch.Tensor], generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether its draft token is accepted, and the token drawn where it is not (from
    norm(max(0, p - q))) or, on the last row, the bonus token (from p)."""
    p = target_probs(processed, rows)
    q = torch.zeros_like(p)
    one_hot: list[int] = []  # rows of n-gram drafts: q is one-hot on the proposed token
    own_rows: list[int] = []
    own_parts: list[torch.Tensor] = []
    row = 0
    for seq in seqs:
        k = len(seq.spec_token_ids)
        own = draft_probs.get(seq.request_id)
        if own is not None and own.shape[0] >= k:
            own_rows += range(row, row + k)
            own_parts.append(own[:k, : q.shape[1]])
        else:
            one_hot += range(row, row + k)
        row += k + 1
    if own_parts:
        parts = torch.cat(own_parts)
        q[torch.tensor(own_rows, device=q.device), : parts.shape[1]] = parts.to(q.dtype)
    # An n-gram draft may quote a prompt token past the logits (Llama 3.2 Vision's <|image|>): the
    # target gives it no mass and q none on any column, so it is rejected and p drawn from instead.
    inside = drafts < p.shape[1]
    drafts = torch.where(inside, drafts, 0)
    if one_hot:
        index = torch.tensor(one_hot, device=q.device)
        q[index, drafts[index]] = inside[index].to(q.dtype)
    p_draft = p.gather(1, drafts.unsqueeze(1)).squeeze(1).masked_fill(~inside, 0.0)
    q_draft = q.gather(1, drafts.unsqueeze(1)).squeeze(1)
    uniform, exponential = _noise(p, seqs, generators)
    # u < p / q, written without dividing (q = 0 only on the last rows, whose "draft" is padding).
    accepted = uniform * q_draft < p_draft
    residual = (p - q).clamp_min(0.0)
    scores = (residual / exponential).masked_fill(residual <= 0, -1.0)
    return accepted, scores.argmax(dim=-1)


def target_probs(processed: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
    """Normalized p of each row: the distribution the plain sampler draws from for its request."""
    vocab = processed.shape[-1]
    device = processed.device
    k_list = [min(s.params.top_k, vocab) if s.params.top_k > 0 else vocab for s in rows]
    p_list = [s.params.top_p for s in rows]
    min_p_list = [s.params.min_p for s in rows]
    probs = filtered_probs(
        processed.float(), torch.tensor([s.params.temperature or 1.0 for s in rows], device=device),
        torch.tensor(k_list, device=device), torch.tensor(p_list, device=device),
        torch.tensor(min_p_list, device=device), any(k < vocab for k in k_list) or any(x < 1 for x in p_list),
        any(m > 0 for m in min_p_list),
    )
    return probs / probs.sum(dim=-1, keepdim=True)


def _noise(p: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator | None],
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform [R] and Exp(1) [R, V] noise; a seeded request's rows from its own generator."""
    uniform = torch.rand(p.shape[0], device=p.device)
    exponential = torch.empty_like(p).exponential_()
    row = 0
    for seq, gen in zip(seqs, generators, strict=True):
        n = 1 + len(seq.spec_token_ids)
        if gen is not None:
            uniform[row : row + n] = torch.rand(n, device=p.device, generator=gen)
            exponential[row : row + n].exponential_(generator=gen)
        row += n
    return uniform, exponential
