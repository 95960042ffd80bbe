"""gpt-oss's attention sinks (a learned logit per head in the softmax's denominator): the Triton
paged attention equals the PyTorch reference through TRITON_INTERPRET=1 in decode (split and not),
prefill, chunked prefill with a sliding window and mixed batches; the reference equals transformers'
eager gpt-oss attention; on a GPU, the kernel equals the reference at gpt-oss-20b's shapes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_attention import (
    BOUND,
    DTYPES,
    check_interpreted,
    gpu,
    interpreter_main,
    make_batch,
    rel_err,
    run_interpreted,
)

from sloth_kernels.attention import paged_attention, paged_attention_ref


def sinks_case(q_lens: list[int], seq_lens: list[int], heads: tuple[int, int], head_dim: int, block_size: int,
               dtype: str, window: int | None = None, num_decodes: int = 0,
               **overrides: int) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_attention import paged_attention_triton

        dt = DTYPES[dtype]
        q, kc, vc, meta = make_batch(q_lens, seq_lens, heads[0], heads[1], head_dim, block_size, dt)
        # Sinks large enough to take a visible share of the softmax, one head far above its keys.
        sinks = (torch.randn(heads[0]) * 2.0).to(dt)
        sinks[0] = 6.0
        scale = head_dim**-0.5
        out = paged_attention_triton(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                     meta.max_query_len, scale, window, num_decodes, sinks=sinks, **overrides)
        ref = paged_attention_ref(q, kc, vc, meta, scale, window, sinks=sinks)
        # The sinks change the result: a kernel ignoring them would fail.
        assert rel_err(paged_attention_ref(q, kc, vc, meta, scale, window), ref) > 10 * BOUND[dt]
        return rel_err(out, ref), BOUND[dt]

    return run


CASES: dict[str, Callable[[], tuple[float, float]]] = {
    "sinks_decode": sinks_case([1, 1, 1], [5, 40, 17], (4, 2), 64, 8, "fp32", num_splits=1),
    "sinks_decode_split": sinks_case([1, 1, 1], [5, 90, 17], (4, 2), 64, 16, "fp32", num_splits=3),
    "sinks_decode_sliding_split": sinks_case([1, 1, 1], [3, 70, 41], (8, 2), 64, 8, "fp32", window=19,
                                             num_splits=4, block_n=16),
    "sinks_prefill_gqa4": sinks_case([7, 19], [7, 19], (8, 2), 64, 8, "fp32"),
    "sinks_chunked_sliding": sinks_case([5, 1, 26], [37, 12, 44], (4, 2), 64, 8, "fp32", window=9,
                                        block_m=16, block_n=16),
    "sinks_mixed_two_kernels_bf16": sinks_case([1, 5, 1, 26], [70, 37, 12, 44], (4, 2), 64, 16, "bf16",
                                               window=16, num_decodes=1, num_splits=2),
}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_attention_with_sinks_matches_reference_in_interpreter(interpreted: dict[str, object],
                                                                       name: str) -> None:
    check_interpreted(interpreted, name)


def test_reference_with_sinks_equals_transformers_gpt_oss_attention() -> None:
    """One sequence through our paged reference and through transformers' eager_attention_forward
    (sliding window mask included) give the same output."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    torch.manual_seed(0)
    heads, kv_heads, head_dim, n, window = 4, 2, 16, 11, 4
    q, kc, vc, meta = make_batch([n], [n], heads, kv_heads, head_dim, 8, torch.float32)
    sinks = torch.randn(heads)
    ours = paged_attention_ref(q, kc, vc, meta, 0.25, window, sinks=sinks)
    blocks = meta.block_tables[0, : -(-n // 8)].long()
    k = kc[blocks].flatten(0, 1)[:n].transpose(0, 1)[None]  # [1, kv_heads, n, D]
    v = vc[blocks].flatten(0, 1)[:n].transpose(0, 1)[None]
    pos = torch.arange(n)
    visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    mask = torch.zeros(n, n).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]
    module = torch.nn.Module()
    module.num_key_value_groups, module.sinks, module.training = heads // kv_heads, sinks, False
    theirs, _ = eager_attention_forward(module, q.transpose(0, 1)[None], k, v, mask, scaling=0.25)
    torch.testing.assert_close(ours, theirs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("window", [None, 128])
def test_paged_attention_sinks_gpu_gpt_oss_shapes(window: int | None) -> None:
    """gpt-oss-20b's attention (64 q heads, 8 kv heads, head_dim 64), decode and prefill in one batch."""
    q, kc, vc, meta = make_batch([1, 1, 300, 37], [700, 90, 300, 1000], 64, 8, 64, 16, torch.bfloat16, "cuda")
    meta.num_decodes = 2
    sinks = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    out = paged_attention(q, kc, vc, meta, 0.125, window, sinks=sinks)
    ref = paged_attention_ref(q, kc, vc, meta, 0.125, window, sinks=sinks)
    assert rel_err(out, ref) <= BOUND[torch.bfloat16]


if __name__ == "__main__":
    interpreter_main(CASES)
