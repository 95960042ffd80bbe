"""`/metrics` after real traffic: the scrape parses with prometheus-client's parser and its counters
and histogram counts match what the clients saw; request log lines are JSON with --log-format json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import BASE_MODEL, LiveServer, launch
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = launch(tmp_path_factory.mktemp("metrics"), "metrics", "--log-format", "json", "--log-level", "info")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_and_histograms_match_what_clients_saw(metrics_server: LiveServer) -> None:
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
    assert value(s, "vllm:prompt_tokens_total", model_name=BASE_MODEL) == prompt_tokens
    assert value(s, "vllm:generation_tokens_total", model_name=BASE_MODEL) == completion_tokens
    assert value(s, "vllm:prompt_tokens_total", model_name="upper") == upper_prompt
    assert value(s, "vllm:generation_tokens_total", model_name="upper") == upper_completion
    for reason, count in reasons.items():
        seen = sum(value(s, "vllm:request_success_total", model_name=m, finished_reason=reason)
                   for m in (BASE_MODEL, "upper"))
        assert seen == count, reason
    assert value(s, "vllm:time_to_first_token_seconds_count", model_name=BASE_MODEL) == 3
    assert value(s, "vllm:e2e_request_latency_seconds_count", model_name="upper") == 2
    assert value(s, "vllm:request_queue_time_seconds_count", model_name=BASE_MODEL) == 3
    itl = value(s, "vllm:inter_token_latency_seconds_count", model_name=BASE_MODEL)
    assert itl == completion_tokens - 3  # every token after the first of each request
    assert value(s, "vllm:num_requests_running") == 0 and value(s, "vllm:num_requests_waiting") == 0
    assert value(s, "sloth:loaded_adapters") == 1
    assert value(s, "sloth:step_forward_time_seconds_count") > 0
    # Stalls while serving (none expected here: no Triton on the CPU, the start-up heap frozen).
    assert (("sloth:kernel_compiles_while_serving_total", ()) in s) and (("sloth:slow_gc_pauses_total", ()) in s)
    assert value(s, "sloth:kernel_compiles_while_serving_total") == 0
    assert value(s, "vllm:iteration_tokens_total_sum") >= prompt_tokens + upper_prompt


def test_stop_string_counts_as_stop(metrics_server: LiveServer) -> None:
    before = scrape(metrics_server)
    r = metrics_server.client().completions.create(
        model=BASE_MODEL, prompt="Return the", max_tokens=30, temperature=0, stop=[" "], extra_body={"min_tokens": 3}
    )
    assert r.choices[0].finish_reason == "stop"
    after = scrape(metrics_server)
    key = {"model_name": BASE_MODEL, "finished_reason": "stop"}
    assert value(after, "vllm:request_success_total", **key) == value(before, "vllm:request_success_total", **key) + 1


def test_metrics_need_no_api_key_and_request_logs_are_json(metrics_server: LiveServer) -> None:
    lines = [json.loads(line) for line in Path(metrics_server.log_path).read_text().splitlines()
             if line.startswith("{") and '"sloth_serve.requests"' in line]
    assert lines, "no request log lines"
    last = lines[-1]
    for key in ("request_id", "model", "prompt_tokens", "output_tokens", "ttft_s", "e2e_s", "finish_reason"):
        assert key in last
