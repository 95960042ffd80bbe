"""Weight prefetch (server/loader/prefetch.py): the files the load will read are handed to the kernel's
readahead (an adapter folder's base's), and nothing is asked when they would not fit in memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL, prefetch


@pytest.fixture
def advised(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    seen: list[str] = []

    def fake(fd: int, offset: int, length: int, advice: int) -> None:
        assert (offset, length, advice) == (0, 0, os.POSIX_FADV_WILLNEED)
        seen.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))

    monkeypatch.setattr(os, "posix_fadvise", fake)
    return seen


def test_the_models_weight_files_are_prefetched(advised: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefetch, "available_memory", lambda: 2**40)
    files = sorted(DEMO_MODEL.glob("*.safetensors"))
    assert prefetch.prefetch_weights(str(DEMO_MODEL)) == sum(f.stat().st_size for f in files) > 0
    assert [Path(p).name for p in advised] == [f.name for f in files]


def test_an_adapter_folder_prefetches_its_base(advised: list[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefetch, "available_memory", lambda: 2**40)
    cfg = json.loads((DEMO_ADAPTER / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(DEMO_MODEL)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    assert prefetch.weight_files(str(tmp_path)) == sorted(DEMO_MODEL.glob("*.safetensors"))
    assert prefetch.prefetch_weights(str(tmp_path)) > 0 and advised


def test_a_sharded_folder_prefetches_the_files_its_index_names(advised: list[str], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Mistral's repositories hold consolidated.safetensors beside the shards the load reads: reading
    it ahead would double the start-up's reads (or skip the prefetch for the doubled size)."""
    monkeypatch.setattr(prefetch, "available_memory", lambda: 2**40)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors"):
        (tmp_path / name).write_bytes(b"x" * 100)
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [p.name for p in prefetch.weight_files(str(tmp_path))] == sorted(set(weight_map.values()))
    assert prefetch.prefetch_weights(str(tmp_path)) == 200
    assert sorted(Path(p).name for p in advised) == sorted(set(weight_map.values()))


def test_nothing_is_asked_when_the_weights_would_not_fit(advised: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    size = sum(f.stat().st_size for f in DEMO_MODEL.glob("*.safetensors"))
    monkeypatch.setattr(prefetch, "available_memory", lambda: size)  # more than half of it
    assert prefetch.prefetch_weights(str(DEMO_MODEL)) == 0 and advised == []
    monkeypatch.setattr(prefetch, "available_memory", lambda: None)  # unknown: leave the kernel alone
    assert prefetch.prefetch_weights(str(DEMO_MODEL)) == 0 and advised == []


def test_a_missing_folder_is_left_to_the_load(advised: list[str], tmp_path: Path) -> None:
    assert prefetch.prefetch_weights(str(tmp_path / "missing")) == 0 and advised == []


def test_available_memory_is_read_on_linux() -> None:
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo")
    available = prefetch.available_memory()
    assert available is not None and available > 2**20
