"""Per-token key ends (Gemma 3's bidirectional attention among the tokens of one image): the Triton
paged attention equals the PyTorch reference through TRITON_INTERPRET=1 for fresh and chunked
prompts, spans that start in the cached context, sliding windows, several dtypes and mixed batches
with decodes; the reference equals attention under transformers' mask for Gemma 3 images
(causal OR same image, AND the sliding window), built here independently."""

from __future__ import annotations

import random
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

from sloth_kernels.attention import AttnMetadata, paged_attention, paged_attention_ref


def image_spans(q_lens: list[int], seq_lens: list[int], seed: int) -> list[list[tuple[int, int]]]:
    """Random spans [a, b) per sequence that end inside its queries (a chunk never ends inside one)
    and may start in its cached context; decodes get none."""
    rng = random.Random(seed)
    spans: list[list[tuple[int, int]]] = []
    for q_len, seq_len in zip(q_lens, seq_lens, strict=True):
        found: list[tuple[int, int]] = []
        pos = max(seq_len - q_len - 3, 0) if q_len > 1 else seq_len
        while q_len > 1 and pos < seq_len - 2:
            a = pos + rng.randint(0, 3)
            b = min(a + rng.randint(2, 9), seq_len)
            if b > max(a + 1, seq_len - q_len):
                found.append((a, b))
            pos = b + rng.randint(0, 2)
        spans.append(found)
    return spans


def key_ends_of(q_lens: list[int], seq_lens: list[int], spans: list[list[tuple[int, int]]]) -> torch.Tensor:
    ends: list[int] = []
    for q_len, seq_len, found in zip(q_lens, seq_lens, spans, strict=True):
        for p in range(seq_len - q_len, seq_len):
            ends.append(next((b for a, b in found if a <= p < b), 0))
    return torch.tensor(ends, dtype=torch.int32)


def key_end_case(q_lens: list[int], seq_lens: list[int], heads: tuple[int, int], head_dim: int, block_size: int,
                 dtype: str, window: int | None = None, num_decodes: int = 0,
                 **overrides: int) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_attention import paged_attention_triton

        dt = DTYPES[dtype]
        q, kc, vc, meta = make_batch(q_lens, seq_lens, heads[0], heads[1], head_dim, block_size, dt)
        meta.key_ends = key_ends_of(q_lens, seq_lens, image_spans(q_lens, seq_lens, sum(seq_lens)))
        scale = head_dim**-0.5
        out = paged_attention_triton(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                     meta.max_query_len, scale, window, num_decodes, key_ends=meta.key_ends,
                                     **overrides)
        ref = paged_attention_ref(q, kc, vc, meta, scale, window)
        causal = AttnMetadata(**{**{f: getattr(meta, f) for f in meta.__slots__}, "key_ends": None})
        # The spans change the result: a kernel ignoring them would fail.
        assert rel_err(paged_attention_ref(q, kc, vc, causal, scale, window), ref) > 10 * BOUND[dt]
        return rel_err(out, ref), BOUND[dt]

    return run


CASES: dict[str, Callable[[], tuple[float, float]]] = {
    "key_ends_prefill_gqa2": key_end_case([23, 30], [23, 30], (4, 2), 64, 8, "fp32"),
    "key_ends_prefill_small_tiles": key_end_case([40, 19], [40, 19], (4, 2), 64, 8, "fp32", block_m=16, block_n=16),
    "key_ends_chunked_over_context": key_end_case([13, 26], [29, 44], (8, 2), 64, 16, "fp32", block_m=32,
                                                  block_n=16),
    "key_ends_sliding_window": key_end_case([30, 17], [37, 40], (4, 2), 64, 8, "fp32", window=9, block_m=16,
                                            block_n=16),
    "key_ends_mixed_two_kernels": key_end_case([1, 1, 21, 9], [40, 7, 33, 9], (4, 1), 64, 8, "fp32",
                                               num_decodes=2, block_m=16),
    "key_ends_mixed_one_kernel_bf16": key_end_case([1, 25, 1, 12], [30, 31, 5, 12], (4, 2), 64, 16, "bf16"),
    "key_ends_gemma_heads_fp16": key_end_case([18, 33], [18, 50], (2, 1), 256, 16, "fp16"),
}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_attention_with_key_ends_matches_reference_in_interpreter(interpreted: dict[str, object],
                                                                          name: str) -> None:
    check_interpreted(interpreted, name)


@pytest.mark.parametrize("window", [None, 6])
def test_reference_key_ends_equal_gemma3_image_mask(window: int | None) -> None:
    """A prompt chunked in two over the paged cache, through key ends, equals dense attention under
    Gemma 3's mask: (causal OR same image) AND (inside the sliding window)."""
    torch.manual_seed(0)
    n, context, heads, kv_heads, head_dim = 24, 7, 4, 2, 16
    images = [(3, 9), (12, 16), (18, 23)]  # the first starts in the cached context
    q, kc, vc, meta = make_batch([n - context], [n], heads, kv_heads, head_dim, 8, torch.float32)
    meta.key_ends = key_ends_of([n - context], [n], [images])
    ours = paged_attention_ref(q, kc, vc, meta, 0.3, window)
    blocks = meta.block_tables[0, : -(-n // 8)].long()
    k = kc[blocks].flatten(0, 1)[:n].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
    v = vc[blocks].flatten(0, 1)[:n].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
    block = torch.full((n,), -1)
    for i, (a, b) in enumerate(images):
        block[a:b] = i
    pos = torch.arange(n)
    qp, kp = pos[context:, None], pos[None, :]
    visible = (kp <= qp) | ((block[context:, None] == block[None, :]) & (block[None, :] >= 0))
    if window is not None:
        visible &= kp > qp - window
    scores = (q.transpose(0, 1) @ k.transpose(1, 2)) * 0.3
    theirs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v
    torch.testing.assert_close(ours, theirs.transpose(0, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@gpu
def test_paged_attention_key_ends_gpu_gemma3_shapes() -> None:
    """Gemma 3 4B's attention (8 q heads, 4 kv heads, head_dim 256) over 256-token images, decodes first."""
    q_lens, seq_lens = [1, 1, 600, 300], [700, 90, 600, 1000]
    q, kc, vc, meta = make_batch(q_lens, seq_lens, 8, 4, 256, 16, torch.bfloat16, "cuda")
    meta.num_decodes = 2
    spans = [[], [], [(10, 266), (300, 556)], [(720, 976)]]
    meta.key_ends = key_ends_of(q_lens, seq_lens, spans).cuda()
    for window in (None, 1024):
        out = paged_attention(q, kc, vc, meta, 0.0625, window)
        ref = paged_attention_ref(q, kc, vc, meta, 0.0625, window)
        assert rel_err(out, ref) <= BOUND[torch.bfloat16]


if __name__ == "__main__":
    interpreter_main(CASES)
