"""How the parent of --api-server-count N names a front end's end in its log (issue 22)."""

from __future__ import annotations

import signal

from sloth_serve.api_servers import how_it_ended


def test_signals_are_named_and_unnamed_ones_numbered() -> None:
    assert how_it_ended(-signal.SIGKILL) == "was killed by SIGKILL"
    assert how_it_ended(3) == "exited with code 3"
    # A real-time signal past SIGRTMIN has no name in signal.Signals: the watcher must not raise on it
    rt = signal.SIGRTMIN + 3
    assert how_it_ended(-rt) == f"was killed by signal {rt}"
