"""An engine process that another process started (the --api-server-count parent, server/api_servers.py):
where a front end finds it, and how it sees it end without being its parent (a pidfd, which turns
readable when the process exits, in place of multiprocessing's sentinel)."""

from __future__ import annotations

import os
import select
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SharedEngine:
    """One front end's view of the shared engine: its pid and this front end's two sockets."""

    pid: int
    commands: str  # ipc:// address this front end binds; the engine pulls its commands from it
    events: str  # ipc:// address this front end binds; the engine pushes its events to it
    index: int = 0  # this front end's number (0 .. --api-server-count - 1)


class EngineWatch:
    """What ProcessEngineClient reads of its engine process (sentinel, join, exitcode, pid), for a
    process this one did not start: it cannot be reaped or killed from here (its parent does both)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sentinel = os.pidfd_open(pid)
        self._status: int | None = None

    def join(self, timeout: float | None = None) -> None:
        select.select([self.sentinel], [], [], timeout)

    @property
    def exitcode(self) -> int | None:
        """None while it runs; then as multiprocessing gives it (-N: killed by signal N) where the
        process is still to be reaped by its parent, else 1 (ended, how is not known here)."""
        if self._status is None:
            if select.select([self.sentinel], [], [], 0)[0] == []:
                return None
            self._status = _wait_status(self.pid)
        if self._status is None:
            return 1
        signal_number = self._status & 0x7F
        return -signal_number if signal_number else (self._status >> 8) & 0xFF

    def close(self) -> None:
        os.close(self.sentinel)


def _wait_status(pid: int) -> int | None:
    """The exit status of an ended process not yet reaped (a zombie): the 52nd field of its
    /proc/PID/stat (Linux 3.5+). None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    # fields[0] is the 3rd field (state); exit_code is the 52nd.
    if len(fields) < 50 or fields[0] != "Z":
        return None
    return int(fields[49])
