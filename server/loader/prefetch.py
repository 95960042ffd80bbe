"""Ask the kernel to read the model's weight files into the page cache while the engine process is
still importing torch and Unsloth (seconds of CPU work with the disk idle), so the load that follows
reads memory rather than a cold disk or network volume. posix_fadvise(WILLNEED) only starts the
reads and returns; nothing is copied into this process, and pages the kernel needs back it drops."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Only when the files fit this share of the memory available: a model larger than memory would
# push its own first files out before they are read.
MAX_SHARE_OF_AVAILABLE = 0.5


def weight_files(model: str) -> list[Path]:
    """The safetensors files the load will read: the model folder's, or an adapter folder's base's."""
    folder = Path(model).expanduser()
    if (folder / "adapter_config.json").is_file():
        try:
            from .folders import resolve_adapter_base

            folder = resolve_adapter_base(folder)
        except (OSError, ValueError):
            return []  # the load reports it
    if not folder.is_dir():
        return []
    # A sharded checkpoint's index names the files the load reads: a folder may hold others it
    # never opens (Mistral's repositories ship consolidated.safetensors, a second copy of the model).
    index = folder / "model.safetensors.index.json"
    try:
        named = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        named = None  # the load reports a bad index
    if named is not None:
        return sorted(p for p in (folder / n for n in named) if p.is_file())
    return sorted(folder.glob("*.safetensors"))


def available_memory() -> int | None:
    """Bytes of memory available to this process: /proc/meminfo's MemAvailable, within a cgroup (v2)
    limit when one is set; None where neither can be read."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def prefetch_weights(model: str) -> int:
    """Start reading the model's weight files into the page cache; returns the bytes asked for (0 when
    skipped: no files, no posix_fadvise on this platform, or more than half the available memory)."""
    advise = getattr(os, "posix_fadvise", None)
    files = weight_files(model)
    if advise is None or not files:
        return 0
    sizes = [f.stat().st_size for f in files]
    available = available_memory()
    if available is None or sum(sizes) > MAX_SHARE_OF_AVAILABLE * available:
        return 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
    return sum(sizes)
