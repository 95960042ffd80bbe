"""Kernel compiles after warmup are logged with the kernel and its constants; those before, or inside
`quiet()` (an adapter's first load), are not."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from sloth_serve.engine import stalls


class _Fn:
    name = "sloth_kernels.triton_lora._shrink_kernel"


def _compile(key: str) -> None:
    # As Triton passes them: constants keyed by argument index, the signature by name.
    info = {"signature": {"x_ptr": "*bf16", "T": "i32", "SPLIT": "constexpr", "BLOCK_T": "constexpr"},
            "constants": {(3,): 64, (2,): 4}}
    stalls._on_miss(key=key, fn=_Fn(), compile=info)
    stalls._on_compiled(key=key, fn=_Fn(), compile=info)


def test_compiles_are_reported_only_while_serving(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sloth_serve.engine.stalls")
    before = stalls.compiles_while_serving
    stalls.serving(False)
    _compile("warmup-variant")
    assert stalls.compiles_while_serving == before and not caplog.records
    stalls.serving()
    try:
        with stalls.quiet():
            _compile("adapter-variant")
        assert stalls.compiles_while_serving == before and not caplog.records
        _compile("late-variant")
    finally:
        stalls.serving(False)
    assert stalls.compiles_while_serving == before + 1
    (record,) = caplog.records
    assert "_shrink_kernel compiled while serving" in record.getMessage()
    assert "BLOCK_T=64" in record.getMessage() and "SPLIT=4" in record.getMessage()
    assert not stalls._started  # nothing left pending


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_triton_compile_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def _scale(x_ptr, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * FACTOR, mask=offs < n)

    assert stalls.watch_compiles()
    x = torch.ones(100, device="cuda")
    _scale[(1,)](x, 100, FACTOR=2, BLOCK=128)  # before serving: not reported
    caplog.set_level(logging.WARNING, logger="sloth_serve.engine.stalls")
    before = stalls.compiles_while_serving
    stalls.serving()
    try:
        _scale[(1,)](x, 100, FACTOR=2, BLOCK=128)  # cached in this process: no compile
        _scale[(1,)](x, 100, FACTOR=3, BLOCK=128)  # a new variant
    finally:
        stalls.serving(False)
    torch.cuda.synchronize()
    assert x[0].item() == 12.0
    assert stalls.compiles_while_serving == before + 1
    assert "_scale compiled while serving" in caplog.text and "FACTOR=3" in caplog.text


def test_slow_collections_are_reported_and_the_heap_freezes(caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    caplog.set_level(logging.WARNING, logger="sloth_serve.engine.stalls")
    stalls.watch_gc()
    stalls.watch_gc()  # once only
    assert gc.callbacks.count(stalls._on_gc) == 1
    monkeypatch.setattr(stalls, "GC_REPORT_S", 0.0)  # every collection counts as slow here
    before = stalls.slow_collections
    gc.collect()  # not serving: not reported
    assert stalls.slow_collections == before and not caplog.records
    stalls.serving()
    try:
        garbage = [[] for _ in range(1000)]
        for a, b in itertools.pairwise(garbage):
            a.append(b)
            b.append(a)
        del garbage, a, b
        gc.collect()
    finally:
        stalls.serving(False)
    assert stalls.slow_collections >= before + 1  # (young generations may have run meanwhile too)
    assert "garbage collection of generation 2" in caplog.text and "1000 objects freed" in caplog.text
    try:
        kept = {"a start-up object": [1, 2, 3]}
        frozen = stalls.freeze_heap()
        assert frozen >= 1 and gc.get_freeze_count() == frozen
        assert not any(o is kept for o in gc.get_objects())  # out of the collector's reach
    finally:
        gc.unfreeze()
