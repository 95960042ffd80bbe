"""Rejection sampling keeps the target's distribution: with draft tokens from n-gram lookup (q one-hot)
or drawn from a draft distribution q, every emitted token is distributed as the target's p after
temperature / top-k / top-p / min-p. Checked on many independent sequences at once, with a fixed
seed, by total-variation distance against p (a wrong acceptance rule is far outside the bound)."""

from __future__ import annotations

import pytest
import torch

from sloth_kernels.sampling import filtered_probs
from sloth_serve.engine.sampler import Sampler
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.engine.sequence import Sequence
from sloth_serve.engine.spec_decode.rejection import sample_with_drafts

VOCAB = 10
K = 2  # draft tokens per sequence
N = 12_000  # sequences: the TV distance of N draws from p itself is about 0.01
TV_BOUND = 0.03


def target_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    rows = logits.shape[0]
    p = filtered_probs(logits, torch.full((rows,), params.temperature), torch.full((rows,), params.top_k or VOCAB),
                       torch.full((rows,), params.top_p), torch.full((rows,), params.min_p))
    return p / p.sum(dim=-1, keepdim=True)


def tv(tokens: list[int], p: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB).double()
    return 0.5 * (counts / counts.sum() - p.double()).abs().sum().item()


def run(params: SamplingParams, drafts: list[list[int]], q: torch.Tensor | None, logits: torch.Tensor,
        ) -> tuple[list[Sequence], list[int]]:
    seqs = [Sequence(f"r{i}", [1, 2, 3], params) for i in range(len(drafts))]
    for seq, d in zip(seqs, drafts, strict=True):
        seq.spec_token_ids = list(d)
    probs = {} if q is None else {seq.request_id: q for seq in seqs}
    tokens, _ = sample_with_drafts(Sampler(torch.device("cpu")), logits.repeat(len(seqs), 1), seqs, probs)
    return seqs, tokens


def emitted(seqs: list[Sequence], tokens: list[int], position: int) -> list[int]:
    """Each sequence's emitted token at `position` (0: first), where it emitted that many."""
    out = []
    for seq, last in zip(seqs, tokens, strict=True):
        new = [*seq.spec_token_ids[: seq.num_spec_accepted], last]
        if len(new) > position:
            out.append(new[position])
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.9, top_k=6),
    SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05),
])
def test_ngram_drafts_keep_the_target_distribution(params: SamplingParams) -> None:
    torch.manual_seed(0)
    logits = torch.randn(K + 1, VOCAB) * 1.5
    p = target_p(logits, params)
    # The proposal is the second most likely token then the most likely: often accepted, often not.
    order = p.argsort(dim=-1, descending=True)
    draft = [int(order[0, 1]), int(order[1, 0])]
    seqs, tokens = run(params, [draft] * N, None, logits)
    first = emitted(seqs, tokens, 0)
    assert tv(first, p[0]) < TV_BOUND
    # Given the first draft token was accepted, the next token is distributed as p at row 1.
    second = emitted([s for s in seqs if s.num_spec_accepted >= 1], [t for s, t in zip(seqs, tokens, strict=True)
                                                                      if s.num_spec_accepted >= 1], 1)
    assert len(second) > N // 10 and tv(second, p[1]) < TV_BOUND
    # The test can tell: always accepting the first draft token is far from p.
    assert tv([draft[0]] * N, p[0]) > 10 * TV_BOUND


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5)])
def test_draft_model_tokens_keep_the_target_distribution(params: SamplingParams) -> None:
    torch.manual_seed(1)
    logits = torch.randn(K + 1, VOCAB) * 1.5
    p = target_p(logits, params)
    q = target_p(torch.randn(K, VOCAB) * 1.5, SamplingParams(temperature=1.0))  # a different draft model
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True) for j in range(K)], dim=1).tolist()
    seqs, tokens = run(params, drafts, q, logits)
    assert tv(emitted(seqs, tokens, 0), p[0]) < TV_BOUND
    accepted = [(s, t) for s, t in zip(seqs, tokens, strict=True) if s.num_spec_accepted >= 1]
    assert len(accepted) > N // 10
    assert tv(emitted([s for s, _ in accepted], [t for _, t in accepted], 1), p[1]) < TV_BOUND
    assert tv([d[0] for d in drafts], p[0]) > 3 * TV_BOUND  # q itself is not p: the test can tell


def test_greedy_accepts_exactly_the_argmax_prefix() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    params = SamplingParams(temperature=0.0, logprobs=1)
    seqs, tokens = run(params, [[1, 0], [1, 2], [2, 0]], None, logits)
    assert [s.num_spec_accepted for s in seqs] == [2, 1, 0]
    assert tokens == [2, 0, 1]  # bonus after two; the argmax where the first disagreed
    # Logprobs are the target's, one per emitted token.
    assert len(seqs[0].spec_logprobs) == 2 and seqs[0].spec_logprobs[1].token_id == 0
    expected = torch.log_softmax(logits[1], dim=-1)[0].item()
    assert seqs[0].spec_logprobs[1].logprob == pytest.approx(expected)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9, top_k=6), SamplingParams(temperature=0.0)])
def test_ngram_draft_past_the_logits_is_rejected(params: SamplingParams) -> None:
    """An n-gram draft may quote a prompt token the model has no logit for (Llama 3.2 Vision's
    <|image|>, past its vocabulary): it is rejected, and the token drawn in its place is distributed
    as p (q has no mass on any column), where indexing q with it failed (on a GPU, a device-side
    assert ending the engine)."""
    torch.manual_seed(2)
    logits = torch.randn(1 + K, VOCAB)
    seqs, tokens = run(params, [[VOCAB, 3]] * N, None, logits)
    assert all(seq.num_spec_accepted == 0 for seq in seqs)
    first = emitted(seqs, tokens, 0)
    if params.is_greedy:
        assert set(first) == {int(logits[0].argmax())}
    else:
        assert tv(first, target_p(logits[:1], params)[0]) < TV_BOUND
