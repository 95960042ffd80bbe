"""Sampling a token per row from logits: temperature, top-k, top-p, min-p, then the exponential race
(argmax of p / q with q ~ Exp(1), which draws from p). The noise q is an input, so that seeded
requests draw the same tokens whichever implementation runs.

Dispatch: Triton (`triton_sampling`, no sort: thresholds found by bisection over the row) on CUDA
when asked for (`use_triton`, the server's `--sampler triton`) and once `verified` has checked it
against this reference on the device; the PyTorch reference otherwise, and for good once the kernel
fails while serving. triton is imported on that path only: it is an optional extra, absent on CPU
installs. Penalties, logit bias and grammar masks are applied to the logits before.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_VERIFIED: dict[torch.device, bool] = {}  # per device: whether the Triton kernel may serve


def sample_ref(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, q: torch.Tensor, cut: bool | None = None, floor: bool | None = None,
) -> torch.Tensor:
    """logits [B, V] fp32, per-row temperature (> 0), top_k (V: off), top_p (1: off), min_p (0: off),
    q [B, V] Exp(1) noise -> token ids [B]. A token whose logit is -inf is never drawn. `cut` (some
    row has top-k or top-p) and `floor` (some row has min-p) may be given from host-side values, so
    that deciding costs no device sync; they are read from the tensors otherwise."""
    probs = filtered_probs(logits, temperature, top_k, top_p, min_p, cut, floor)
    # p = 0 (masked) must never win, even where q drew exactly 0 (0 / 0 is NaN, and argmax takes NaN).
    scores = (probs / q).masked_fill(probs <= 0, -1.0)
    return scores.argmax(dim=-1)


def filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, cut: bool | None = None, floor: bool | None = None,
) -> torch.Tensor:
    """The distribution sample_ref draws from: [B, V] probabilities after temperature, top-k,
    top-p and min-p (min-p's dropped mass is not renormalized: the race draws in proportion).
    Speculative decoding's rejection sampler compares these for target and draft."""
    logits = logits / temperature.unsqueeze(1)
    vocab = logits.shape[-1]
    if cut is None:
        cut = bool((top_k < vocab).any()) or bool((top_p < 1).any())
    if floor is None:
        floor = bool((min_p > 0).any())
    if cut:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        drop = ranks >= top_k.unsqueeze(1)
        probs_sorted = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop |= (probs_sorted.cumsum(dim=-1) - probs_sorted) >= top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if floor:
        least = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < least, 0.0)
    return probs


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, q: torch.Tensor, cut: bool | None = None, floor: bool | None = None,
    use_triton: bool = False,
) -> torch.Tensor:
    if use_triton and logits.is_cuda and verified(logits.device):
        from .triton_sampling import sample_triton

        try:
            return sample_triton(logits, temperature, top_k, top_p, min_p, q)
        except Exception as exc:  # e.g. a compilation for a new size class: never fail the step
            disable(logits.device, exc)
    return sample_ref(logits, temperature, top_k, top_p, min_p, q, cut, floor)


def verified(device: torch.device) -> bool:
    """Whether the kernel agrees with the reference on this device, checked once on random rows with
    every cut-off active, at a vocabulary of each size class Triton compiles apart (multiple of 16 or
    not): the dispatch uses the reference when it does not, or when the kernel cannot run here."""
    ok = _VERIFIED.get(device)
    if ok is None:
        ok = _VERIFIED[device] = _check(device)
    return ok


def disable(device: torch.device, exc: BaseException) -> None:
    """The kernel failed while serving: use the reference from now on."""
    log.warning("Triton sampler failed on %s (%s): sampling with the PyTorch reference from now on", device, exc)
    _VERIFIED[device] = False


def _check(device: torch.device) -> bool:
    try:
        from .triton_sampling import sample_triton

        gen = torch.Generator(device=device).manual_seed(0)
        ok = True
        for vocab in (5000, 5008):
            rows = 16
            logits = torch.randn(rows, vocab, device=device, generator=gen) * 3
            logits[1, 100:] = float("-inf")
            q = torch.empty(rows, vocab, device=device).exponential_(generator=gen)
            temperature = torch.linspace(0.3, 1.5, rows, device=device)
            top_k = torch.tensor([vocab, 1, 5, 50, vocab, vocab, 40, vocab] * 2, device=device)
            top_p = torch.tensor([1.0, 1.0, 1.0, 0.9, 0.5, 0.95, 0.8, 1.0] * 2, device=device)
            min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.05, 0.2] * 2, device=device)
            got = sample_triton(logits, temperature, top_k, top_p, min_p, q)
            ok = ok and bool(torch.equal(got, sample_ref(logits, temperature, top_k, top_p, min_p, q)))
    except Exception as exc:  # a kernel that cannot compile or run here: the reference serves
        log.warning("Triton sampler unavailable on %s (%s): sampling with the PyTorch reference", device, exc)
        return False
    if not ok:
        log.warning("Triton sampler disagrees with the reference on %s: sampling with the PyTorch reference", device)
    return ok
