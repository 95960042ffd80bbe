"""`compile_variants` launches every attention kernel variant that the dispatcher can pick, so that
no serving step meets a Triton compile: every variant a sweep of decode, prefill and mixed batches
picks is among those it launched. The kernels are replaced by recorders (nothing runs)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sloth_kernels import triton_attention as ta


class _Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **constexprs)` records the constexprs."""

    def __init__(self, keys: tuple[str, ...], seen: set[tuple]) -> None:
        self.keys, self.seen = keys, seen

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        def launch(*args: object, **kwargs: object) -> None:
            self.seen.add(tuple(kwargs[k] for k in self.keys))
        return launch


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> set[tuple]:
    seen: set[tuple] = set()
    monkeypatch.setattr(ta, "_paged_attention_kernel",
                        _Recorder(("BLOCK_M", "BLOCK_Q", "BLOCK_N", "DECODE", "SPLIT", "SLIDING", "SOFTCAP",
                                                             "SINKS"), seen))
    monkeypatch.setattr(ta, "_merge_splits_kernel", _Recorder(("BLOCK_S", "SINKS"), seen))
    monkeypatch.setattr(ta, "_num_sms", lambda device: 132)  # the H200's: tiles and splits as there
    return seen


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "window", "softcap", "sinks"),
                         [(32, 8, 128, None, None, False), (32, 8, 64, None, None, False), (8, 8, 64, None, None, False),
                          (32, 8, 128, 4096, None, False), (16, 8, 256, 4096, 50.0, False),
                          (64, 8, 64, 128, None, True), (64, 8, 64, None, None, True)])  # gpt-oss's two kinds
def test_compile_variants_covers_every_dispatch(recorded: set[tuple], num_heads: int, num_kv_heads: int,
                                                head_dim: int, window: int | None, softcap: float | None,
                                                sinks: bool) -> None:
    block_size, max_model_len = 16, 8192
    k = torch.zeros((4, block_size, num_kv_heads, head_dim))
    sink = torch.zeros(num_heads) if sinks else None
    launched = ta.compile_variants(num_heads, k, k, 3, max_model_len, window, softcap, sink)
    warmed = set(recorded)
    assert launched > 0 and warmed
    recorded.clear()
    width = max_model_len // block_size

    def run(decodes: int, prompts: list[int], table_width: int) -> None:
        lens = [1] * decodes + prompts
        t = sum(lens)
        q = torch.zeros((t, num_heads, head_dim))
        batch = len(lens)
        starts = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
        tables = torch.zeros((batch, table_width), dtype=torch.int32)
        ta.paged_attention_triton(q, k, k, tables, torch.ones(batch, dtype=torch.int32), starts, max(lens), 1.0,
                                  window, num_decodes=decodes, softcap=softcap, sinks=sink)

    for decodes in (1, 2, 3, 5, 8, 16, 17, 31, 32, 33, 48, 64, 65, 128, 256):
        for table_width in (1, 2, 5, 13, 64, width):
            run(decodes, [], table_width)  # eager decode (batches past the graphs, --enforce-eager)
            for prompt in (1 + 1, 5, 16, 17, 64, 100, 512):
                run(decodes, [prompt], table_width)  # a mixed step: a prompt joins decoding sequences
    for prompts in ([2], [7], [16], [33], [64, 64], [300], [2048]):
        run(0, prompts, 64)
    assert recorded <= warmed, f"variants a step can meet but the warmup never launched: {recorded - warmed}"
