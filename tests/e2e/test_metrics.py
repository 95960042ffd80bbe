"""`/metrics` after real traffic: the scrape parses with prometheus-client's parser and its counters
and histogram counts match what the clients saw; every query of vLLM's own Grafana dashboard finds
data; `vllm:lora_requests_info` names the adapters running; HTTP responses are counted by route and
status; request log lines are JSON with --log-format json."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from live_server import API_KEY, BASE_MODEL, LiveServer, launch
from prometheus_client.parser import text_string_to_metric_families

VLLM_DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "vllm_grafana_queries.yaml"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = launch(tmp_path_factory.mktemp("metrics"), "metrics", "--log-format", "json", "--log-level", "info",
                    "--max-queued-requests", "1", api_key=API_KEY)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def scrape(server: LiveServer) -> Samples:
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def selector_matches(selector: Any, name: str, labels: dict[str, str]) -> bool:
    """Whether a PromQL vector selector picks this sample (name and every label matcher)."""
    if selector.name and selector.name != name:
        return False
    for m in selector.matchers.matchers:
        actual = name if m.name == "__name__" else labels.get(m.name, "")
        op = str(m.op).rsplit(".", 1)[-1]
        ok = {"Equal": actual == m.value, "NotEqual": actual != m.value,
              "Re": re.fullmatch(m.value, actual) is not None, "NotRe": re.fullmatch(m.value, actual) is None}[op]
        if not ok:
            return False
    return True


def selectors(query: str) -> list[Any]:
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    found: list[Any] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql.VectorSelector):
            found.append(node)
        return True

    promql.walk(promql.parse(query), visit)
    return found


def test_every_query_of_vllms_dashboard_finds_data_after_one_request(metrics_server: LiveServer) -> None:
    metrics_server.client().completions.create(model=BASE_MODEL, prompt="Return the", max_tokens=6, temperature=0)
    samples = scrape(metrics_server)
    dashboard = yaml.safe_load(VLLM_DASHBOARD.read_text())
    # The dashboard's model picker: label_values({__name__=~"vllm:.*"}, model_name).
    picker = re.fullmatch(r"label_values\((.+),\s*model_name\)", dashboard["variables"]["model_name"])
    assert picker is not None
    (every_vllm,) = selectors(picker.group(1))
    vllm_samples = [(n, dict(labels)) for n, labels in samples if selector_matches(every_vllm, n, dict(labels))]
    assert vllm_samples and all("model_name" in labels for _, labels in vllm_samples), \
        sorted({n for n, labels in vllm_samples if "model_name" not in labels})
    assert BASE_MODEL in {labels["model_name"] for _, labels in vllm_samples}
    for panel, queries in dashboard["panels"].items():
        for query in queries:
            query = query.replace("$model_name", BASE_MODEL).replace("$__rate_interval", "1m")
            for sel in selectors(query):
                matched = [v for (n, labels), v in samples.items() if selector_matches(sel, n, dict(labels))]
                assert matched, f"{panel}: no series for {sel}"
                if re.search(r"_(total|sum|count|bucket)$", sel.name):  # counts: one request moved them
                    assert max(matched) > 0, f"{panel}: {sel} is all zero after a request"


def test_alert_rules_read_series_and_labels_the_server_exports(metrics_server: LiveServer) -> None:
    samples = scrape(metrics_server)
    alerts = yaml.safe_load((VLLM_DASHBOARD.parents[2] / "deploy" / "prometheus" / "alerts.yml").read_text())
    for rule in (r for group in alerts["groups"] for r in group["rules"]):
        for sel in selectors(rule["expr"]):
            if sel.name == "up":  # Prometheus's own series
                continue
            series = [dict(labels) for n, labels in samples if n == sel.name]
            assert series, f"{rule['alert']}: the server exports no {sel.name}"
            for m in sel.matchers.matchers:
                assert any(m.name in labels for labels in series), f"{rule['alert']}: {sel.name} has no {m.name}"


def test_counters_and_histograms_match_what_clients_saw(metrics_server: LiveServer) -> None:
    before = scrape(metrics_server)
    client = metrics_server.client()
    prompt_tokens = completion_tokens = 0
    reasons = {"stop": 0, "length": 0}
    for i in range(3):  # non-streamed, base model
        r = client.completions.create(model=BASE_MODEL, prompt=f"Return the {i}", max_tokens=6, temperature=0)
        prompt_tokens += r.usage.prompt_tokens
        completion_tokens += r.usage.completion_tokens
        reasons[r.choices[0].finish_reason] += 1
    upper_prompt = upper_completion = 0
    for i in range(2):  # streamed, through the adapter
        stream = client.chat.completions.create(
            model="upper", messages=[{"role": "user", "content": f"What is `os.{i}`?"}], max_tokens=5,
            temperature=0, stream=True, stream_options={"include_usage": True},
        )
        chunks = list(stream)
        reasons[next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)] += 1
        usage = chunks[-1].usage
        upper_prompt += usage.prompt_tokens
        upper_completion += usage.completion_tokens
    s = scrape(metrics_server)

    def delta(name: str, **labels: str) -> float:
        return value(s, name, **labels) - value(before, name, **labels)

    assert delta("vllm:prompt_tokens_total", model_name=BASE_MODEL) == prompt_tokens
    assert delta("vllm:generation_tokens_total", model_name=BASE_MODEL) == completion_tokens
    assert delta("vllm:prompt_tokens_total", model_name="upper") == upper_prompt
    assert delta("vllm:generation_tokens_total", model_name="upper") == upper_completion
    for reason, count in reasons.items():
        seen = sum(delta("vllm:request_success_total", model_name=m, finished_reason=reason)
                   for m in (BASE_MODEL, "upper"))
        assert seen == count, reason
    assert delta("vllm:time_to_first_token_seconds_count", model_name=BASE_MODEL) == 3
    assert delta("vllm:e2e_request_latency_seconds_count", model_name="upper") == 2
    assert delta("vllm:request_queue_time_seconds_count", model_name=BASE_MODEL) == 3
    assert delta("vllm:request_max_num_generation_tokens_sum", model_name=BASE_MODEL) == completion_tokens
    itl = delta("vllm:inter_token_latency_seconds_count", model_name=BASE_MODEL)
    assert itl == completion_tokens - 3  # every token after the first of each request
    assert delta("vllm:time_per_output_token_seconds_count", model_name=BASE_MODEL) == itl  # the old name
    assert value(s, "vllm:num_requests_running", model_name=BASE_MODEL) == 0
    assert value(s, "vllm:num_requests_waiting", model_name=BASE_MODEL) == 0
    assert value(s, "vllm:gpu_cache_usage_perc", model_name=BASE_MODEL) == \
        value(s, "vllm:kv_cache_usage_perc", model_name=BASE_MODEL)
    assert value(s, "sloth:loaded_adapters") == 1
    assert value(s, "sloth:server_status", status="ok") == 1 and value(s, "sloth:server_status", status="dead") == 0
    assert value(s, "sloth:max_queued_requests") == 1 and value(s, "sloth:num_requests_in_flight") == 0
    assert value(s, "sloth:step_forward_time_seconds_count") > 0
    # Stalls while serving (none expected here: no Triton on the CPU, the start-up heap frozen).
    assert (("sloth:kernel_compiles_while_serving_total", ()) in s) and (("sloth:slow_gc_pauses_total", ()) in s)
    assert value(s, "sloth:kernel_compiles_while_serving_total") == 0
    assert delta("vllm:iteration_tokens_total_sum", model_name=BASE_MODEL) >= prompt_tokens + upper_prompt


def test_stop_string_counts_as_stop(metrics_server: LiveServer) -> None:
    before = scrape(metrics_server)
    r = metrics_server.client().completions.create(
        model=BASE_MODEL, prompt="Return the", max_tokens=30, temperature=0, stop=[" "], extra_body={"min_tokens": 3}
    )
    assert r.choices[0].finish_reason == "stop"
    key = {"model_name": BASE_MODEL, "finished_reason": "stop"}
    expected = value(before, "vllm:request_success_total", **key) + 1
    # The response returns at the stop string; the engine counts the request at its next step.
    deadline = time.monotonic() + 10
    while (seen := value(scrape(metrics_server), "vllm:request_success_total", **key)) < expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert seen == expected


class HeldStream:
    """A long stream read in a thread, so the test can look at the server while it runs."""

    def __init__(self, server: LiveServer, model: str) -> None:
        self.events: list[str] = []
        body = {"model": model, "prompt": "Return the", "max_tokens": 1500, "stream": True, "ignore_eos": True}
        self._thread = threading.Thread(target=self._read, args=(server, body), daemon=True)
        self._stop = threading.Event()
        self._thread.start()
        deadline = time.monotonic() + 60
        while len(self.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.events) >= 2, "the stream did not start"

    def _read(self, server: LiveServer, body: dict[str, Any]) -> None:
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, headers=server.headers(),
                          timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line)
                if self._stop.is_set():
                    return  # closing the connection aborts the request

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def lora_info(samples: Samples) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), v) for (n, labels), v in samples.items() if n == "vllm:lora_requests_info"]


def test_lora_requests_info_names_the_running_adapters(metrics_server: LiveServer) -> None:
    held = HeldStream(metrics_server, "upper")
    try:
        during = lora_info(scrape(metrics_server))
    finally:
        held.close()
    assert len(during) == 1, during  # only the current state, no stale series
    labels, seen_at = during[0]
    assert labels == {"running_lora_adapters": "upper", "waiting_lora_adapters": "", "max_lora": "4",
                      "model_name": BASE_MODEL}
    assert time.time() - 60 < seen_at <= time.time() + 1  # a Unix time, as vLLM's
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (labels, _), = lora_info(scrape(metrics_server))
        if labels["running_lora_adapters"] == "":
            break
        time.sleep(0.05)
    assert labels["running_lora_adapters"] == "", "the adapter still shows as running after its stream closed"


def test_http_responses_are_counted_by_route_and_status(metrics_server: LiveServer) -> None:
    url, headers = metrics_server.url, metrics_server.headers()

    def count(route: str, method: str, status: int) -> float:
        return value(scrape(metrics_server), "sloth:http_requests_total", route=route, method=method,
                     status=str(status))

    cases: list[tuple[str, str, int, Any]] = [
        ("/v1/models", "GET", 401, lambda: httpx.get(f"{url}/v1/models")),
        ("/v1/models/{model_id}", "GET", 404, lambda: httpx.get(f"{url}/v1/models/nope", headers=headers)),
        ("unmatched", "GET", 404, lambda: httpx.get(f"{url}/no/such/path", headers=headers)),
        ("/v1/completions", "POST", 400, lambda: httpx.post(
            f"{url}/v1/completions", json={"model": BASE_MODEL, "prompt": "x", "max_tokens": -1}, headers=headers)),
        ("/v1/completions", "POST", 408, lambda: httpx.post(
            f"{url}/v1/completions", headers=headers, timeout=30,
            json={"model": BASE_MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "timeout": 0.001})),
        ("/v1/completions", "POST", 200, lambda: httpx.post(
            f"{url}/v1/completions", json={"model": BASE_MODEL, "prompt": "x", "max_tokens": 2}, headers=headers,
            timeout=30)),
    ]
    for route, method, status, call in cases:
        before = count(route, method, status)
        assert call().status_code == status, (route, status)
        assert count(route, method, status) == before + 1, (route, method, status)
    # 503: --max-queued-requests 1 and one stream holding it.
    before = count("/v1/completions", "POST", 503)
    held = HeldStream(metrics_server, BASE_MODEL)
    try:
        refused = httpx.post(f"{url}/v1/completions", json={"model": BASE_MODEL, "prompt": "x", "max_tokens": 2},
                             headers=headers, timeout=30)
        in_flight = value(scrape(metrics_server), "sloth:num_requests_in_flight")
    finally:
        held.close()
    assert refused.status_code == 503 and in_flight == 1
    assert count("/v1/completions", "POST", 503) == before + 1


def test_metrics_need_no_api_key_and_request_logs_are_json(metrics_server: LiveServer) -> None:
    assert httpx.get(f"{metrics_server.url}/metrics", timeout=10).status_code == 200  # no key sent
    lines = [json.loads(line) for line in Path(metrics_server.log_path).read_text().splitlines()
             if line.startswith("{") and '"sloth_serve.requests"' in line]
    assert lines, "no request log lines"
    last = lines[-1]
    for key in ("request_id", "model", "prompt_tokens", "output_tokens", "ttft_s", "e2e_s", "finish_reason"):
        assert key in last
