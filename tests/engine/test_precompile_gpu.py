"""`--precompile-only` on a GPU: it fills the compile cache and exits 0, and a second run with the same
flags finds every kernel there (Triton adds no entry), which is what makes the next start warm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sloth_serve.loader import DEMO_ADAPTER

ROOT = Path(__file__).resolve().parents[2]


def precompile(cache: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--precompile-only", "--device", "cuda", "--compile-cache-dir", str(cache), "--port", "0",
             "--max-num-seqs", "8", "--max-model-len", "1024", "--lora", f"upper={DEMO_ADAPTER}"]
    return subprocess.run([sys.executable, "-m", "sloth_serve.cli", *flags], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}, timeout=600)


def entries(cache: Path) -> set[str]:
    return {p.name for p in (cache / "triton").iterdir() if p.is_dir() and not p.name.startswith("tmp.")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precompile_fills_the_cache_and_a_second_run_compiles_nothing(tmp_path: Path) -> None:
    first = precompile(tmp_path / "cc")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "precompile: done, ready in" in first.stderr
    assert "warmup with adapter upper" in first.stderr  # the LoRA kernels too
    compiled = entries(tmp_path / "cc")
    assert len(compiled) > 10, compiled
    second = precompile(tmp_path / "cc")
    assert second.returncode == 0, second.stderr[-4000:]
    assert entries(tmp_path / "cc") == compiled  # every variant read back from the cache
