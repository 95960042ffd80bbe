"""The Triton sampler draws the same token as the PyTorch reference from the same noise: under
TRITON_INTERPRET=1 on the CPU (in a subprocess, see test_attention.py's harness) and on a GPU at
Llama-3's vocabulary. Each case's error is the number of rows whose token differs (bound 0)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_attention import check_interpreted, interpreter_main, run_interpreted

from sloth_kernels.sampling import sample_ref


def rows_params(rows: int, vocab: int, top_k: list[int], top_p: list[float], min_p: list[float]):  # type: ignore[no-untyped-def]
    def cycle(values: list, n: int) -> list:  # type: ignore[type-arg]
        return [values[i % len(values)] for i in range(n)]

    return (torch.linspace(0.2, 1.7, rows), torch.tensor(cycle(top_k, rows)),
            torch.tensor(cycle(top_p, rows)), torch.tensor(cycle(min_p, rows)))


def case(rows: int, vocab: int, top_k: list[int], top_p: list[float], min_p: list[float], masked: bool = False,
         scale: float = 3.0) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_sampling import sample_triton

        logits = torch.randn(rows, vocab) * scale
        if masked:  # a grammar mask or a min_tokens ban: -inf logits are never drawn
            logits[:, ::3] = float("-inf")
            logits[0, :] = float("-inf")  # one token left: it must be drawn whatever the cut-offs
            logits[0, 5] = 0.0
        q = torch.empty(rows, vocab).exponential_()
        params = rows_params(rows, vocab, [min(k, vocab) for k in top_k], top_p, min_p)
        got = sample_triton(logits, *params, q)
        want = sample_ref(logits, *params, q)
        bad = int((got != want).sum())
        if masked and bool(torch.isinf(logits.gather(1, got.unsqueeze(1))).any()):
            bad += 1000
        return float(bad), 0.0

    return run


V = 3001  # odd: the last block is ragged
CASES = {
    "plain_temperature": case(8, V, [V], [1.0], [0.0]),
    "top_k": case(8, V, [1, 2, 17, 300, V], [1.0], [0.0]),
    "top_p": case(8, V, [V], [0.1, 0.5, 0.9, 0.99], [0.0]),
    "top_k_then_top_p": case(8, V, [5, 40, 1000], [0.3, 0.8, 0.95], [0.0]),
    "min_p": case(8, V, [V], [1.0], [0.02, 0.1, 0.5]),
    "all_three": case(9, V, [50, V, 7], [0.9, 0.7, 1.0], [0.05, 0.0, 0.2]),
    "masked_rows": case(6, V, [V, 10], [0.8, 1.0], [0.0, 0.1], masked=True),
    "peaked_logits": case(6, 700, [V, 3], [0.95, 1.0], [0.0], scale=20.0),
}


def self_check() -> tuple[float, float]:
    """The startup check the dispatch relies on passes (both vocabulary size classes)."""
    from sloth_kernels.sampling import verified

    return (0.0 if verified(torch.device("cpu")) else 1.0), 0.0


CASES["startup_self_check"] = self_check


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_sampler_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    check_interpreted(interpreted, name)


def test_reference_respects_each_cut_off() -> None:
    """The reference itself: top-k 1 is greedy; top-p keeps the top token at any p; -inf is never drawn."""
    torch.manual_seed(0)
    logits = torch.randn(64, 500) * 2
    q = torch.empty(64, 500).exponential_()
    ones = torch.ones(64)
    greedy = sample_ref(logits, ones, torch.full((64,), 1), ones, torch.zeros(64), q)
    assert torch.equal(greedy, logits.argmax(dim=-1))
    tiny_p = sample_ref(logits, ones, torch.full((64,), 500), torch.full((64,), 1e-6), torch.zeros(64), q)
    assert torch.equal(tiny_p, logits.argmax(dim=-1))
    logits[:, :250] = float("-inf")
    drawn = sample_ref(logits, ones, torch.full((64,), 500), ones, torch.zeros(64), q)
    assert bool((drawn >= 250).all())


def test_a_failure_while_serving_turns_the_kernel_off() -> None:
    from sloth_kernels import sampling

    device = torch.device("meta")  # any key: the state is per device
    sampling._VERIFIED[device] = True
    sampling.disable(device, RuntimeError("compilation failed"))
    assert not sampling.verified(device)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows", [1, 64])
def test_triton_sampler_matches_reference_on_gpu(rows: int) -> None:
    from sloth_kernels.sampling import verified
    from sloth_kernels.triton_sampling import sample_triton

    assert verified(torch.device("cuda"))
    torch.manual_seed(rows)
    vocab = 128256
    logits = torch.randn(rows, vocab, device="cuda") * 4
    q = torch.empty(rows, vocab, device="cuda").exponential_()
    params = [p.cuda() for p in rows_params(rows, vocab, [vocab, 50, 1000], [0.9, 1.0, 0.6], [0.0, 0.05])]
    assert torch.equal(sample_triton(logits, *params, q), sample_ref(logits, *params, q))


if __name__ == "__main__":
    interpreter_main(CASES)
