"""Start-up timing: each phase (imports, weight loading, conversion, CUDA graphs, kernel warm-up) is
logged as one `start-up: ...` line and recorded on the process's StartupClock, whose summary line
("ready in X s (load a, quantize/convert b, warm-up c, graphs d, other e)") the server logs once the
model is ready. The engine process times its own phases and sends them to the front end."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STARTUP_LOGGER = "sloth_serve.startup"
# What a phase counts as in the summary; "other": on the way but none of these (checks, imports,
# KV-cache allocation, the tokenizer). Labels as the summary line writes them.
PHASE_KINDS = {
    "load": "load",
    "convert": "quantize/convert",
    "warmup": "warm-up",
    "graphs": "graphs",
    "other": "other",
}


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    kind: str  # one of PHASE_KINDS
    seconds: float
    nested: float = 0.0  # seconds of phases timed inside this one (counted as theirs in the summary)


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat against the boot-time clock), so
    the summary counts the interpreter's start and the first imports too; None elsewhere."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # after the command name, which may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks after boot
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - started, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StartupClock:
    """The phases of one start-up, and when it began (time.monotonic())."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.monotonic() if started is None else started
        self.phases: list[Phase] = []
        self.claimed = False  # taken by a server (ServerState): a second server begins its own
        self._lock = threading.Lock()  # the engine thread and the event loop's workers both record

    @classmethod
    def from_process_start(cls) -> StartupClock:
        age = process_age()
        return cls(time.monotonic() - age if age is not None else None)

    def record(self, phase: Phase) -> None:
        with self._lock:
            self.phases.append(phase)

    def extend(self, phases: Iterable[Phase]) -> None:
        """Phases timed in another process (the engine's)."""
        with self._lock:
            self.phases.extend(phases)

    def mark(self) -> int:
        with self._lock:
            return len(self.phases)

    def since(self, mark: int) -> tuple[Phase, ...]:
        with self._lock:
            return tuple(self.phases[mark:])

    def totals(self, elapsed: float) -> dict[str, float]:
        """Seconds by kind, and "total": `elapsed`; "other" is what the timed kinds leave of it (the
        front end's own imports overlap the engine process's load, so they are not added up)."""
        with self._lock:
            sums = {kind: 0.0 for kind in PHASE_KINDS if kind != "other"}
            for phase in self.phases:
                if phase.kind in sums:
                    sums[phase.kind] += phase.seconds - phase.nested
        sums["other"] = max(elapsed - sum(sums.values()), 0.0)
        sums["total"] = elapsed
        return sums

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def summary_line(totals: dict[str, float]) -> str:
    """`ready in 41.2 s (load 20.1 s, quantize/convert 3.2 s, warm-up 6.0 s, graphs 2.1 s, other 9.8 s)`."""
    parts = ", ".join(f"{label} {totals.get(kind, 0.0):.1f} s" for kind, label in PHASE_KINDS.items())
    return f"ready in {totals['total']:.1f} s ({parts})"


_current = StartupClock.from_process_start()
_current_lock = threading.Lock()
_open = threading.local()  # per thread: the nested seconds of each phase being timed, outermost first


def current() -> StartupClock:
    """The clock phases are recorded on in this process."""
    return _current


def begin() -> StartupClock:
    """A new start-up from now (or from the process's start: `sloth-serve` and the engine process)."""
    global _current
    with _current_lock:
        _current = StartupClock.from_process_start()
        return _current


def claim() -> StartupClock:
    """The clock a server reports: the current one if no server has taken it yet (the CLI began it
    at the process's start), else a new one from now (several servers in one process: tests)."""
    global _current
    with _current_lock:
        if _current.claimed:
            _current = StartupClock()
        _current.claimed = True
        return _current


@contextmanager
def startup_phase(name: str, kind: str = "other", log: bool = True) -> Iterator[None]:
    """Time one start-up phase: a `start-up: NAME took S s` line (with `phase`, `kind` and `seconds`
    fields under --log-format json), and the phase on the current clock; phases timed inside it count
    as theirs, not its. Not when it raises (the error says that), nor where `log` is false (a phase
    with nothing to do here)."""
    if kind not in PHASE_KINDS:
        raise ValueError(f"start-up phase kind {kind!r} is not one of {', '.join(PHASE_KINDS)}")
    stack: list[float] = _open.__dict__.setdefault("stack", [])
    stack.append(0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        nested = stack.pop()
    seconds = time.perf_counter() - start
    if not log:  # not a phase: what was timed inside it is its parent's nested time
        if stack:
            stack[-1] += nested
        return
    if stack:
        stack[-1] += seconds
    record_phase(Phase(name, kind, seconds, nested))


def record_phase(phase: Phase) -> None:
    """Log a timed phase (`start-up: NAME took S s [KIND]`) and keep it on the current clock."""
    _current.record(phase)
    logging.getLogger(STARTUP_LOGGER).info(
        "start-up: %s took %.2fs [%s]", phase.name, phase.seconds, phase.kind,
        extra={"fields": {"phase": phase.name, "kind": phase.kind, "seconds": round(phase.seconds, 3)}},
    )
