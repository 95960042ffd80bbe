"""Start-up timing (server/startup_clock.py): each phase is one grep-able log line and counts once in
the summary by its kind, nested phases as theirs; the engine process's phases cross the wire and the
summary reaches the log line and the Prometheus gauge."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from sloth_serve import startup_clock
from sloth_serve.engine.outputs import EngineInfo
from sloth_serve.engine.wire import Ready, Reply, event_codec
from sloth_serve.metrics import EngineMetrics
from sloth_serve.startup_clock import Phase, StartupClock, startup_phase, summary_line


@pytest.fixture
def clock() -> StartupClock:
    return startup_clock.begin()


def test_each_phase_is_one_log_line_with_its_kind_and_seconds(clock: StartupClock,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=startup_clock.STARTUP_LOGGER), startup_phase("read the weights", "load"):
        time.sleep(0.02)
    (record,) = [r for r in caplog.records if r.name == startup_clock.STARTUP_LOGGER]
    assert record.getMessage().startswith("start-up: read the weights took 0.0")
    assert record.getMessage().endswith("s [load]")
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["phase"] == "read the weights" and fields["kind"] == "load" and fields["seconds"] >= 0.02
    (phase,) = clock.phases
    assert phase.kind == "load" and phase.seconds >= 0.02


def test_nested_phases_count_as_theirs_not_their_parents(clock: StartupClock) -> None:
    with startup_phase("load the model", "convert"):
        with startup_phase("import Unsloth", "load"):
            time.sleep(0.03)
        time.sleep(0.01)
    totals = clock.totals(elapsed=1.0)
    inner, outer = clock.phases
    assert outer.nested == pytest.approx(inner.seconds)
    assert totals["load"] == pytest.approx(inner.seconds)
    assert totals["convert"] == pytest.approx(outer.seconds - inner.seconds)
    assert 0.005 < totals["convert"] < 0.03


def test_an_unlogged_phase_passes_its_nested_time_up(clock: StartupClock) -> None:
    with startup_phase("outer", "warmup"), startup_phase("skipped here", "load", log=False), \
            startup_phase("inner", "graphs"):
        time.sleep(0.02)
    inner, outer = clock.phases
    assert (inner.name, outer.name) == ("inner", "outer")
    assert outer.nested == pytest.approx(inner.seconds)


def test_a_failed_phase_is_not_recorded(clock: StartupClock) -> None:
    with pytest.raises(RuntimeError), startup_phase("load", "load"):
        raise RuntimeError("no weights")
    assert clock.phases == []


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of load, convert, warmup, graphs, other"), \
            startup_phase("x", "compile"):
        pass


def test_summary_line_adds_up_to_the_wall_time() -> None:
    clock = StartupClock(started=0.0)
    clock.extend([Phase("read", "load", 20.0), Phase("adopt", "convert", 3.0), Phase("warm", "warmup", 6.0),
                  Phase("graphs", "graphs", 2.0), Phase("imports", "other", 30.0)])
    totals = clock.totals(elapsed=41.0)
    # "other" is what the timed kinds leave of the wall time: the front end's imports overlap the load.
    assert totals == {"load": 20.0, "convert": 3.0, "warmup": 6.0, "graphs": 2.0, "other": 10.0, "total": 41.0}
    assert summary_line(totals) == ("ready in 41.0 s (load 20.0 s, quantize/convert 3.0 s, warm-up 6.0 s, "
                                    "graphs 2.0 s, other 10.0 s)")


def test_the_clock_starts_with_the_process() -> None:
    age = startup_clock.process_age()
    if age is None:
        pytest.skip("no /proc here")
    assert age > 0
    assert StartupClock.from_process_start().elapsed() == pytest.approx(age, abs=0.5)


def test_a_second_server_in_one_process_claims_a_new_clock() -> None:
    first = startup_clock.begin()
    assert startup_clock.claim() is first  # the CLI's clock: counted from the process's start
    second = startup_clock.claim()
    assert second is not first and startup_clock.current() is second and second.elapsed() < 1


def test_engine_phases_cross_the_wire() -> None:
    phases = (Phase("read base through Unsloth", "load", 1.5), Phase("capture CUDA graphs", "graphs", 0.25, 0.0))
    info = EngineInfo("m", None, frozenset({2}), 100, 512, 64, 16, 16, startup_phases=phases)
    codec = event_codec()
    assert codec.decode(codec.encode(Ready(info))).info.startup_phases == phases
    reply = Reply(3, result=16, startup_phases=phases[1:])
    assert codec.decode(codec.encode(reply)).startup_phases == phases[1:]


def test_startup_gauge_has_a_series_per_kind_and_the_total() -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry, lambda adapter_id: "base")
    metrics.set_startup({"load": 1.0, "convert": 0.5, "warmup": 0.0, "graphs": 0.0, "other": 2.25, "total": 3.75})
    assert registry.get_sample_value("sloth:startup_seconds", {"phase": "total"}) == 3.75
    assert registry.get_sample_value("sloth:startup_seconds", {"phase": "other"}) == 2.25
