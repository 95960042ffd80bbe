"""Sampler: filters keep exactly the tokens they should, seeded draws repeat, penalties apply."""

from __future__ import annotations

import pytest
import torch
from factories import create_seq

from sloth_serve.engine.sampler import Sampler, gather_logprobs


def draw_many(logits: torch.Tensor, n: int = 400, **params: object) -> set[int]:
    sampler = Sampler(torch.device("cpu"))
    seqs = [create_seq(3, max_tokens=5, **params) for _ in range(n)]
    tokens, _ = sampler(logits.expand(n, -1).clone(), seqs)
    return set(tokens.tolist())


def test_greedy_takes_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    tokens, _ = Sampler(torch.device("cpu"))(logits, [create_seq(temperature=0.0)])
    assert tokens.tolist() == [1]


def test_top_k_keeps_only_the_k_best() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.5]])
    assert draw_many(logits, top_k=2) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert draw_many(probs.log(), top_p=0.7) == {0, 1}
    assert draw_many(probs.log(), top_p=0.4) == {0}


def test_min_p_drops_tokens_below_fraction_of_the_best() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert draw_many(probs.log(), min_p=0.25) == {0, 1, 2}


def test_seeded_draws_repeat_whatever_the_batch() -> None:
    logits = torch.randn(1, 50)
    a = [create_seq(3, seed=42), create_seq(3)]
    b = [create_seq(3), create_seq(3), create_seq(3, seed=42)]
    sampler_a, sampler_b = Sampler(torch.device("cpu")), Sampler(torch.device("cpu"))
    seq_a = [sampler_a(logits.expand(2, -1).clone(), a)[0][0].item() for _ in range(20)]
    seq_b = [sampler_b(logits.expand(3, -1).clone(), b)[0][2].item() for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) > 1


def test_penalties_and_logit_bias_change_the_choice() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9, 0.0]])
    seq = create_seq(3, temperature=0.0, frequency_penalty=1.0)
    seq.append_token(1)
    assert Sampler(torch.device("cpu"))(logits.clone(), [seq])[0].tolist() == [2]
    rep = create_seq(3, temperature=0.0, repetition_penalty=2.0)
    rep.token_ids[:] = [1, 3, 3]  # token 1 appears in the prompt
    assert Sampler(torch.device("cpu"))(logits.clone(), [rep])[0].tolist() == [2]
    biased = create_seq(3, temperature=0.0, logit_bias={3: 5.0})
    assert Sampler(torch.device("cpu"))(logits.clone(), [biased])[0].tolist() == [3]


def test_min_tokens_masks_eos() -> None:
    logits = torch.tensor([[0.0, 9.0, 1.0]])  # eos (1) is the best token
    seq = create_seq(3, temperature=0.0, min_tokens=2, eos=1)
    assert Sampler(torch.device("cpu"))(logits.clone(), [seq])[0].tolist() == [2]


def test_logprobs_of_chosen_and_top_tokens() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    seq = create_seq(3, temperature=0.0, logprobs=2)
    tokens, raw = Sampler(torch.device("cpu"))(logits, [seq])
    assert raw is not None
    (lp,) = gather_logprobs(raw, tokens, [seq])
    assert lp is not None
    expected = torch.log_softmax(logits, -1)[0]
    assert lp.token_id == 1 and abs(lp.logprob - expected[1].item()) < 1e-6
    assert [t for t, _ in lp.top] == [1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_sampling_step_never_waits_for_the_gpu() -> None:
    """Sampled, seeded, greedy, penalized and biased rows in one step: nothing in it synchronizes
    with the device (PyTorch's sync debug mode raises on any synchronizing call), so the host work
    that follows a queued forward pass overlaps it."""
    sampler = Sampler(torch.device("cuda"))
    seqs = [create_seq(temperature=0.8, top_k=50, top_p=0.9), create_seq(temperature=0.0),
            create_seq(temperature=1.0, seed=7, min_p=0.05), create_seq(temperature=0.7, repetition_penalty=1.2,
                                                                        frequency_penalty=0.5, presence_penalty=0.3),
            create_seq(temperature=0.0, logit_bias={3: 5.0}, min_tokens=2)]
    logits = torch.randn(len(seqs), 1000, device="cuda")
    sampler(logits, seqs)  # first use: generators and cached host blocks are made here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens, _ = sampler(logits, seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (len(seqs),)
