"""A step's outputs are observed together (server/metrics.py): the exported series must be what one
observe() / inc() per token would have made (no server, no model)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sloth_serve.engine.outputs import RequestOutput, StepStats
from sloth_serve.engine.sequence import FinishReason
from sloth_serve.metrics import ITL_BUCKETS, EngineMetrics, observe_many


def samples(registry: CollectorRegistry, prefix: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix) and not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_observe_many_matches_repeated_observe() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "x", buckets=ITL_BUCKETS, registry=one)
    h2 = Histogram("h", "x", buckets=ITL_BUCKETS, registry=many)
    for amount, count in [(0.0076, 64), (0.001, 3), (0.0, 2), (100.0, 5), (0.0025, 1), (0.05, 7)]:
        for _ in range(count):
            h1.observe(amount)
        observe_many(h2, amount, count)
    a, b = samples(one, "h"), samples(many, "h")
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        assert math.isclose(value, b[key], rel_tol=1e-12), key


def _step(metrics: EngineMetrics, now: float, outputs: list[RequestOutput]) -> None:
    metrics.on_step(StepStats(now, len(outputs), 0, 10, 10, len(outputs)), outputs)


def test_step_outputs_make_the_per_token_series() -> None:
    """Three requests over four steps (one with two tokens at once, one adapter, one finishing):
    the counters and histograms hold one observation per gap, as per-token calls make them."""
    registry = CollectorRegistry()
    names = {0: "base", 1: "upper"}
    metrics = EngineMetrics(registry, lambda adapter_id: names[adapter_id])

    def out(rid: str, tokens: list[int], adapter: int = 0, done: bool = False) -> RequestOutput:
        return RequestOutput(rid, tokens, done, FinishReason.LENGTH if done else None, num_prompt_tokens=4,
                             num_output_tokens=len(tokens), arrival_time=0.5, first_scheduled_time=0.6,
                             first_token_time=1.0, adapter_id=adapter)

    _step(metrics, 1.0, [out("a", [1]), out("b", [1]), out("c", [1], adapter=1)])
    _step(metrics, 1.01, [out("a", [2]), out("b", [2, 3]), out("c", [2], adapter=1)])
    _step(metrics, 1.03, [out("a", [3], done=True), out("b", [4]), out("c", [3], adapter=1)])
    _step(metrics, 1.04, [out("b", [5]), out("c", [], adapter=1, done=True)])
    got = samples(registry, "vllm:")
    base_gaps = [1.01 - 1.0, 1.01 - 1.0, 1.03 - 1.01, 1.03 - 1.01, 1.04 - 1.03]  # a, b, a, b, b
    assert got[("vllm:generation_tokens_total", (("model_name", "base"),))] == 8
    assert got[("vllm:generation_tokens_total", (("model_name", "upper"),))] == 3
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert got[(f"{name}_count", (("model_name", "base"),))] == 5  # a, b twice each, then b
        assert got[(f"{name}_count", (("model_name", "upper"),))] == 2
        assert math.isclose(got[(f"{name}_sum", (("model_name", "base"),))], sum(base_gaps))
        for bound in ("0.01", "0.025"):
            expected = sum(g <= float(bound) for g in base_gaps)
            assert got[(f"{name}_bucket", (("le", bound), ("model_name", "base")))] == expected
    assert got[("vllm:time_to_first_token_seconds_count", (("model_name", "base"),))] == 2
    assert got[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "base")))] == 1
    assert got[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "upper")))] == 1
    assert "a" not in metrics.last_token_time and "c" not in metrics.last_token_time
