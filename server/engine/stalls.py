"""What stops every request at once while serving, reported as it happens.

- Kernel compiles: Triton compiles a kernel variant the first time a process meets its sizes (or
  loads it from the disk cache). After the warmup each one holds up every request of its step,
  often for half a second. `watch_compiles()` logs each, with the kernel and its compile-time
  constants, so the shape that caused it can be added to the warmup.
- Garbage collection: a full collection walks every tracked object in the process (the loaded
  libraries, the model's modules, one object per KV block: over a million on a large GPU) while
  holding the GIL: the API thread and the engine thread both stop. `freeze_heap()` moves what
  exists after start-up out of the collector's reach (gc.freeze, as vLLM does); `watch_gc()`
  logs any collection that still takes long.

Reports start with `serving()` (the engine calls it once its warmup is over); start-up work that
compiles on purpose (an adapter's first load) runs inside `quiet()`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

GC_REPORT_S = 0.05  # a collection this long or longer is logged

_lock = threading.Lock()
_started: dict[object, float] = {}
_serving = False
_compiles_installed = False
_gc_installed = False
_gc_start: float | None = None
compiles_while_serving = 0  # kernel variants met after serving()
slow_collections = 0  # garbage collections of GC_REPORT_S or longer after serving()


def _constants(compile_info: dict[str, Any]) -> str:
    """The variant's compile-time constants by parameter name (Triton keys them by argument index)."""
    names = list((compile_info.get("signature") or {}).keys())
    parts = []
    for path, value in (compile_info.get("constants") or {}).items():
        index = path[0] if isinstance(path, tuple) and path and isinstance(path[0], int) else None
        name = names[index] if index is not None and index < len(names) else str(path)
        parts.append(f"{name}={value}")
    return ", ".join(parts[:24])


def _on_miss(*, key: object, fn: Any, compile: dict[str, Any], **_: Any) -> None:
    """Triton's jit_cache_hook: a variant not in this process's cache yet (returns None: compile it)."""
    with _lock:
        _started[key] = time.perf_counter()


def _on_compiled(*, key: object, fn: Any, compile: dict[str, Any], **_: Any) -> None:
    global compiles_while_serving
    with _lock:
        t0 = _started.pop(key, None)
        if not _serving:
            return
        compiles_while_serving += 1
    seconds = time.perf_counter() - t0 if t0 is not None else float("nan")
    logger.warning("kernel %s compiled while serving (%.2fs; the step waited): %s", getattr(fn, "name", fn),
                   seconds, _constants(compile))


def watch_compiles() -> bool:
    """Install Triton's compile hooks once per process; False where Triton has none (or another
    tool holds them), and then nothing is reported."""
    global _compiles_installed
    if _compiles_installed:
        return True
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_cache_hook") or not hasattr(runtime, "jit_post_compile_hook"):
        return False
    if runtime.jit_cache_hook is not None or runtime.jit_post_compile_hook is not None:
        return False  # somebody else's hooks (a profiler, a test): leave them be
    runtime.jit_cache_hook = _on_miss
    runtime.jit_post_compile_hook = _on_compiled
    _compiles_installed = True
    return True


def _on_gc(phase: str, info: dict[str, int]) -> None:
    global _gc_start, slow_collections
    if phase == "start":
        _gc_start = time.perf_counter()
        return
    if _gc_start is None:
        return
    seconds, _gc_start = time.perf_counter() - _gc_start, None
    if seconds >= GC_REPORT_S and _serving:
        slow_collections += 1
        logger.warning("garbage collection of generation %s took %.2fs (every thread waited; %s objects freed)",
                       info.get("generation"), seconds, info.get("collected"))


def watch_gc() -> None:
    """Log collections of GC_REPORT_S or longer (once installed, for the life of the process)."""
    global _gc_installed
    if not _gc_installed:
        gc.callbacks.append(_on_gc)
        _gc_installed = True


def freeze_heap() -> int:
    """Collect once, then exclude every object alive now from later collections (they are the
    start-up's: libraries, model, KV-block bookkeeping). Returns how many objects that froze."""
    with quiet():  # this collection is start-up work (0.53 s over 1.04M objects on the H200 server)
        gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serving(on: bool = True) -> None:
    """From now on (or no longer) compiles and slow collections are reported."""
    global _serving
    with _lock:
        _serving = on


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Compiles inside are expected (an adapter's first load captures graphs and warms up)."""
    global _serving
    with _lock:
        was, _serving = _serving, False
    try:
        yield
    finally:
        with _lock:
            _serving = was
