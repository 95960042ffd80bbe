"""Every PromQL query in the deployment files (Grafana dashboard, KEDA triggers, prometheus-adapter
rules) parses, and reads only series the server exports; the exported names agree with
server/metrics.py; the dashboard has the panels operators need."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, EXPORTED_METRICS, K8S, ROOT, exposed_series_names

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sloth-serve.json"
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def grafana_to_promql(expr: str, variables: list[str]) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    for name in variables:  # multi-value variables become regexes: `.*` is what "All" sends
        expr = re.sub(rf"\$\{{{name}(:\w+)?\}}|\${name}\b", ".*", expr)
    return expr


def adapter_rule_queries() -> list[str]:
    rules = yaml.safe_load((K8S / "optional" / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    queries = []
    for rule in rules:
        queries.append(rule["seriesQuery"])
        metric = rule["name"]["matches"].strip("^$")
        queries.append(rule["metricsQuery"].replace("<<.Series>>", metric)
                       .replace("<<.LabelMatchers>>", 'namespace="sloth-serve"').replace("<<.GroupBy>>", "pod"))
    return queries


def all_queries(dashboard: dict[str, Any]) -> list[str]:
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    queries = [grafana_to_promql(t["expr"], variables) for p in panels(dashboard) for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(METRIC, LABEL)
            metric = re.fullmatch(r"label_values\(([^,]+), *\w+\)", variable["query"]["query"]).group(1)
            queries.append(metric)
    scaled = yaml.safe_load((K8S / "scaledobject.yaml").read_text())
    queries += [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    return queries + adapter_rule_queries()


def selected_metrics(query: str) -> set[str]:
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql.VectorSelector) and node.name:
            names.add(node.name)
        return True

    try:
        promql.walk(promql.parse(query), visit)
    except ValueError as exc:
        raise AssertionError(f"not valid PromQL: {query}\n{exc}") from exc
    return names


def test_every_query_parses_and_reads_exported_series(dashboard: dict[str, Any]) -> None:
    exported = exposed_series_names()
    used: set[str] = set()
    for query in all_queries(dashboard):
        names = selected_metrics(query)
        assert names, f"query reads no metric: {query}"
        assert names <= exported, f"{sorted(names - exported)} not exported by the server ({query})"
        used |= names
    # The dashboard's required figures are all there.
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:generation_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "sloth:gpu_memory_used_bytes", "sloth:gpu_memory_reserved_bytes",
                 "vllm:request_success_total"):
        assert name in used, name


def declared_in_server() -> dict[str, str]:
    source = ROOT / "server" / "metrics.py"
    if not source.exists():
        pytest.skip("server/metrics.py is not there yet")
    text = source.read_text()
    found = re.findall(r"\b(Gauge|Counter|Histogram|CounterMetricFamily|GaugeMetricFamily)\(\s*\"((?:vllm|sloth):\w+)\"",
                       text)
    return {name: kind.lower().removesuffix("metricfamily") for kind, name in found}


def test_exported_metric_list_agrees_with_the_server() -> None:
    declared = declared_in_server()
    for name, kind in EXPORTED_METRICS.items():
        assert declared.get(name) == kind, f"server/metrics.py: {name} is {declared.get(name)}, dashboards expect {kind}"
    assert "model_name" in (ROOT / "server" / "metrics.py").read_text(), "per-adapter panels group by model_name"


def test_latency_panels_show_p50_and_p99_from_histograms(dashboard: dict[str, Any]) -> None:
    for metric in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):
        exprs = [t["expr"] for p in panels(dashboard) if p["type"] == "timeseries" for t in p["targets"]
                 if f"{metric}_bucket" in t["expr"]]
        quantiles = {re.match(r"histogram_quantile\(([\d.]+),", e).group(1) for e in exprs}
        assert {"0.5", "0.99"} <= quantiles, metric
        assert all("sum by (le)" in e and "rate(" in e for e in exprs)


def test_per_adapter_panel_splits_by_model_name(dashboard: dict[str, Any]) -> None:
    exprs = [t for p in panels(dashboard) for t in p["targets"] if "vllm:request_success_total" in t["expr"]]
    assert any("by (model_name)" in t["expr"] and "{{model_name}}" in t["legendFormat"] for t in exprs)


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    # No two panels overlap.
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area


# ---- vLLM's own dashboard (vendored queries) ----

VLLM_QUERIES = ROOT / "tests" / "deploy" / "vllm_grafana_queries.yaml"


def test_vllms_dashboard_reads_only_series_the_server_exports() -> None:
    # tests/e2e/test_metrics.py runs the same queries against a live server; this is the offline half.
    text = VLLM_QUERIES.read_text()
    assert "Apache License, Version 2.0" in text and "github.com/vllm-project/vllm/blob/" in text, "keep the notice"
    panels = yaml.safe_load(text)["panels"]
    exported = exposed_series_names()
    assert len(panels) >= 11
    for title, queries in panels.items():
        for query in queries:
            names = selected_metrics(grafana_to_promql(query, ["model_name"]))
            assert names and names <= exported, f"{title}: {sorted(names - exported)} not exported"


# ---- alerting rules ----

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# What an alert may read besides the server's series: Prometheus's own scrape health.
PROMETHEUS_SERIES = {"up"}


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    return [rule for g in groups for rule in g["rules"]]


def aggregations(query: str) -> list[Any]:
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    found: list[Any] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql.AggregateExpr):
            found.append(node)
        return True

    promql.walk(promql.parse(query), visit)
    return found


def test_alert_rules_are_valid_and_read_exported_series(alert_rules: list[dict[str, Any]]) -> None:
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    exported = exposed_series_names() | PROMETHEUS_SERIES
    names = [r["alert"] for r in alert_rules]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[A-Za-z_]\w*", n) for n in names)
    for rule in alert_rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        used = selected_metrics(rule["expr"])
        assert used and used <= exported, f"{rule['alert']}: {sorted(used - exported)} not exported"
        assert promql.parse_duration(rule["for"]).total_seconds() >= 60, f"{rule['alert']}: fires on one blip"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        # An annotation can only name labels the expression keeps: every aggregation keeps them.
        for label in re.findall(r"\$labels\.(\w+)", " ".join(rule["annotations"].values())):
            for agg in aggregations(rule["expr"]):
                assert agg.modifier is not None and label in agg.modifier.labels, (rule["alert"], label)


def test_alert_rules_cover_what_operators_must_hear_about(alert_rules: list[dict[str, Any]]) -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules}

    def alerts_reading(pattern: str) -> list[str]:
        return [name for name, expr in exprs.items() if re.search(pattern, expr)]

    assert alerts_reading(r'sloth:server_status\{status=~"dead\|failed"\}'), "engine dead"
    assert alerts_reading(r"sloth:num_requests_in_flight\s*/\s*sloth:max_queued_requests"), "queue saturation"
    assert alerts_reading(r"vllm:kv_cache_usage_perc\)?\s*>\s*0\.9"), "KV cache nearly full"
    assert alerts_reading(r"histogram_quantile\(0\.99,.*vllm:time_to_first_token_seconds_bucket"), "TTFT p99"
    assert alerts_reading(r'sloth:http_requests_total\{[^}]*status=~"5\.\."'), "error rate"


def test_prometheus_loads_the_alert_rules() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
