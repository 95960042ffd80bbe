"""Prometheus metrics, named and bucketed as vLLM's where vLLM has them (`vllm:*`), so existing
dashboards, autoscalers and routers work unchanged; figures vLLM lacks are `sloth:*`.

The engine client calls `on_step` on the event loop with each step's StepStats and outputs, whichever
process the engine runs in; nothing here waits on the GPU (the forward time comes from CUDA events)."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine.client import RequestOutput, StepStats
from .engine.spec_decode.stats import SpecStats
from .engine.stalls import GC_REPORT_S
from .logs import log_finished_request

# vLLM's buckets, with finer ones below 10 ms for inter-token latency (a GPU step takes a few ms).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
MAX_MODEL_LABELS = 64  # bounded cardinality: adapters past this share the label "other"
SERVER_STATUSES = ("loading", "ok", "draining", "dead", "failed")  # ServerState.status
# With several front ends (--api-server-count) /metrics sums every front end's series (prometheus_client's
# multiprocess mode); a gauge says how. Counters and histograms add up; an engine-wide gauge is set by
# every front end from the same step records: the latest value is the value.
ENGINE_WIDE = "mostrecent"
PER_PROCESS = "livesum"  # each front end's own (its requests in flight): summed over those alive


def observe_many(histogram: Histogram, amount: float, count: int) -> None:
    """`count` observations of `amount`, as `count` calls of observe() would record them, in one update
    of the sum and one of the bucket where prometheus_client's layout allows (its Histogram keeps the
    upper bounds, one value per bucket and the sum); one observe() a time otherwise."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if count == 1 or bounds is None or buckets is None or total is None or len(bounds) != len(buckets) \
            or amount != amount:  # NaN: no bucket; observe() records it as it does
        for _ in range(count):
            histogram.observe(amount)
        return
    i = bisect_left(bounds, amount)  # the first bound >= amount, as observe() picks it
    total.inc(amount * count)
    if i < len(buckets):
        buckets[i].inc(count)


class StallCollector(Collector):
    """What stopped every request at once while serving (server/engine/stalls.py), read at scrape
    time: `counts()` gives (kernel compiles, slow garbage collections) of every process serving."""

    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        compiles, collections = self._counts()
        yield CounterMetricFamily("sloth:kernel_compiles_while_serving",
                                  "Kernel variants compiled after the warmup; each held up its step.", value=compiles)
        yield CounterMetricFamily("sloth:slow_gc_pauses",
                                  f"Garbage collections of {GC_REPORT_S}s or longer while serving (every thread "
                                  "of their process waited).", value=collections)


class LoraInfoCollector(Collector):
    """`vllm:lora_requests_info`: one series whose labels name the adapters with requests running
    and waiting (comma-separated) and the adapter slots per step; its value is the Unix time of the
    step that saw them, as vLLM reports it (routers keep the newest series). vLLM leaves a series
    behind for every combination ever seen; here only the current one is exported. `model_name`
    (the base model) is added, as on every vLLM-named series here."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        running, waiting, seen_at = m.lora_state
        family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests.",
                                   labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters", "model_name"])
        family.add_metric([str(m.max_loras), m.adapter_names(running), m.adapter_names(waiting), m.label(0)], seen_at)
        yield family


class SpecDecodeCollector(Collector):
    """Speculative decoding's counters under vLLM's names, read at scrape time from the scheduler's
    running totals (server/engine/spec_decode/stats.py); absent while speculation is off, as in vLLM.
    Acceptance rate = accepted / draft tokens; mean accepted length = 1 + accepted / drafts."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        stats = self._metrics.spec_stats
        if stats is None or not stats.enabled:
            return
        model = self._metrics.label(0)
        for name, doc, value in (
            ("vllm:spec_decode_num_drafts", "Verify steps of a sequence with draft tokens.", stats.num_drafts),
            ("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", stats.num_draft_tokens),
            ("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", stats.num_accepted_tokens),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([model], value)
            yield family
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft.", labels=["model_name", "position"])
        for pos, value in enumerate(list(stats.accepted_per_pos)):
            per_pos.add_metric([model, str(pos)], value)
        yield per_pos


class _ModelSeries:
    """The labelled children of one `model_name`, looked up once instead of on every token."""

    __slots__ = ("decode", "e2e", "generation_tokens", "inference", "itl", "max_generation", "prefill",
                 "prompt_tokens", "queue", "req_generation", "req_prompt", "tpot", "ttft")

    def __init__(self, m: EngineMetrics, model: str) -> None:
        self.generation_tokens, self.prompt_tokens = m.generation_tokens.labels(model), m.prompt_tokens.labels(model)
        self.ttft, self.itl, self.tpot = m.ttft.labels(model), m.itl.labels(model), m.tpot.labels(model)
        self.e2e, self.queue, self.inference = m.e2e.labels(model), m.queue.labels(model), m.inference.labels(model)
        self.prefill, self.decode = m.prefill.labels(model), m.decode.labels(model)
        self.req_prompt, self.req_generation = m.req_prompt.labels(model), m.req_generation.labels(model)
        self.max_generation = m.max_generation.labels(model)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, model_name_of: Callable[[int], str], max_loras: int = 0,
                 stall_counts: Callable[[], tuple[int, int]] = lambda: (0, 0), count_steps: bool = True) -> None:
        """`count_steps`: record the engine's per-step figures (preemptions, prefix cache, step tokens
        and forward time); off in all but one of several front ends that share the engine."""
        self.registry = registry
        self.count_steps = count_steps
        self._model_name_of = model_name_of
        self._labels: dict[int, str] = {}
        self._series: dict[str, _ModelSeries] = {}
        self.max_loras = max_loras
        r = registry
        m = ["model_name"]
        engine_wide: dict[str, Any] = {"registry": r, "multiprocess_mode": ENGINE_WIDE}
        per_process: dict[str, Any] = {"registry": r, "multiprocess_mode": PER_PROCESS}
        # Engine-wide figures carry model_name too (the served base model's name), as vLLM's do:
        # vLLM's dashboard filters every panel by it.
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", m, **engine_wide)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", m, **engine_wide)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", m,
                              **engine_wide)
        self.gpu_cache_usage = Gauge("vllm:gpu_cache_usage_perc",
                                     "Fraction of KV-cache blocks in use (0-1). DEPRECATED vLLM name, kept for "
                                     "dashboards that query it: use vllm:kv_cache_usage_perc.", m, **engine_wide)
        self.state_slots = Gauge("sloth:state_slots_in_use", "Per-sequence state slots held by running requests "
                                 "(models with recurrent layers, such as LFM2; 0 for others).", m, **engine_wide)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", m, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               [*m, "finished_reason"], registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Sequences preempted for lack of KV blocks.", m,
                                   registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      m, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", m,
                                   registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Time between consecutive tokens. DEPRECATED vLLM name, kept for dashboards "
                              "that query it: use vllm:inter_token_latency_seconds.", m,
                              buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", m,
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.", m,
                               buckets=REQUEST_BUCKETS, registry=r)
        self.inference = Histogram("vllm:request_inference_time_seconds", "First scheduled to finish.", m,
                                   buckets=REQUEST_BUCKETS, registry=r)
        self.prefill = Histogram("vllm:request_prefill_time_seconds", "First scheduled to first token.", m,
                                 buckets=REQUEST_BUCKETS, registry=r)
        self.decode = Histogram("vllm:request_decode_time_seconds", "First token to finish.", m,
                                buckets=REQUEST_BUCKETS, registry=r)
        self.req_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", m,
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.req_generation = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", m,
                                        buckets=TOKEN_BUCKETS, registry=r)
        # vLLM observes the longest of a request's n choices once; each choice is its own engine
        # request here, so with n > 1 each choice is observed (the same figure for n = 1).
        self.max_generation = Histogram("vllm:request_max_num_generation_tokens",
                                        "Generated tokens per engine request (each choice of n).", m,
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.step_tokens = Histogram("vllm:iteration_tokens_total", "Tokens computed per engine step.", m,
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.forward_time = Histogram("sloth:step_forward_time_seconds",
                                      "Device time of one forward pass (CUDA events; wall time on CPU).",
                                      buckets=STEP_BUCKETS, registry=r)
        self.gpu_used = Gauge("sloth:gpu_memory_used_bytes", "GPU memory allocated by tensors (the engine's, at its last step).", **engine_wide)
        self.gpu_reserved = Gauge("sloth:gpu_memory_reserved_bytes", "GPU memory reserved by the allocator.",
                                  **engine_wide)
        self.adapters = Gauge("sloth:loaded_adapters", "LoRA adapters registered.", **engine_wide)
        self.http_requests = Counter("sloth:http_requests",
                                     "HTTP responses by route template, method and status code (401, 408, 413, "
                                     "503... included; a stream counts its 200 when it starts).",
                                     ["route", "method", "status"], registry=r)
        self.server_status = Gauge("sloth:server_status",
                                   "1 for the server's current status (as /health says it), 0 for the others.",
                                   ["status"], **engine_wide)
        self.in_flight = Gauge("sloth:num_requests_in_flight",
                               "Admitted requests not finished, as --max-queued-requests counts them.", **per_process)
        self.in_flight_limit = Gauge("sloth:max_queued_requests", "--max-queued-requests.", **per_process)
        self.startup = Gauge("sloth:startup_seconds",
                             "Seconds the start-up took to ready (phase=total) and by kind: load, convert "
                             "(quantize / adopt / merge), warmup (kernel compiles), graphs (CUDA graph "
                             "capture), other. Set once, when the model is ready.", ["phase"], **engine_wide)
        self.spec_stats: SpecStats | None = None  # the scheduler's, seen at the first step
        # Read at scrape time from this process's state (engine-wide figures or its own).
        self.collectors: tuple[Collector, ...] = (StallCollector(stall_counts), LoraInfoCollector(self),
                                                  SpecDecodeCollector(self))
        for collector in self.collectors:
            r.register(collector)
        base = self.label(0)
        self._running, self._waiting = self.running.labels(base), self.waiting.labels(base)
        self._kv_usage, self._gpu_cache_usage = self.kv_usage.labels(base), self.gpu_cache_usage.labels(base)
        self._state_slots = self.state_slots.labels(base)
        self._preemptions, self._step_tokens = self.preemptions.labels(base), self.step_tokens.labels(base)
        self._prefix_queries, self._prefix_hits = self.prefix_queries.labels(base), self.prefix_hits.labels(base)
        self.last_token_time: dict[str, float] = {}
        self._prefix_seen = (0, 0)
        # Adapter ids with requests running / waiting, and when a step saw them (engine thread
        # writes the whole tuple, the scrape reads it: no lock needed).
        self.lora_state: tuple[frozenset[int], frozenset[int], float] = (frozenset(), frozenset(), time.time())

    def label(self, adapter_id: int) -> str:
        name = self._labels.get(adapter_id)
        if name is None:
            name = self._model_name_of(adapter_id) if len(self._labels) < MAX_MODEL_LABELS else "other"
            self._labels[adapter_id] = name
        return name

    def adapter_names(self, adapter_ids: Iterable[int]) -> str:
        return ",".join(sorted({self.label(i) for i in adapter_ids if i}))

    def series(self, model: str) -> _ModelSeries:
        found = self._series.get(model)
        if found is None:
            found = self._series[model] = _ModelSeries(self, model)
        return found

    def set_server(self, status: str, in_flight: int, limit: int) -> None:
        """Scrape-time figures of the HTTP side (GET /metrics sets them)."""
        for name in SERVER_STATUSES:
            self.server_status.labels(name).set(1 if name == status else 0)
        self.in_flight.set(in_flight)
        self.in_flight_limit.set(limit)

    def set_startup(self, totals: dict[str, float]) -> None:
        for phase, seconds in totals.items():
            self.startup.labels(phase).set(round(seconds, 3))

    def on_step(self, stats: StepStats, outputs: list[RequestOutput]) -> None:
        """One engine step: its record, and the outputs it produced (observed at the step's end time)."""
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        usage = stats.kv_cache_usage
        self._kv_usage.set(usage)
        self._gpu_cache_usage.set(usage)
        self._state_slots.set(stats.num_state_slots_used)
        if self.count_steps:
            if stats.num_step_tokens:
                self._step_tokens.observe(stats.num_step_tokens)
            if stats.num_preempted:
                self._preemptions.inc(stats.num_preempted)
            if stats.forward_seconds is not None:
                self.forward_time.observe(stats.forward_seconds)
            self._sync_prefix_counters(stats.num_prefix_queries, stats.num_prefix_hits)
        self.max_loras = stats.max_loras
        self.gpu_used.set(stats.gpu_memory_allocated)
        self.gpu_reserved.set(stats.gpu_memory_reserved)
        self.lora_state = (stats.running_adapters, stats.waiting_adapters, time.time())
        self.spec_stats = stats.spec
        self._observe_outputs(outputs, stats.time)

    def _sync_prefix_counters(self, queries: int, hits: int) -> None:
        # The block manager keeps running totals; counters move forward by the difference.
        seen_q, seen_h = self._prefix_seen
        if queries > seen_q:
            self._prefix_queries.inc(queries - seen_q)
        if hits > seen_h:
            self._prefix_hits.inc(hits - seen_h)
        self._prefix_seen = (queries, hits)

    def _observe_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        """A step's outputs, observed together: a step gives each running request a token, so the
        gaps since their last tokens are mostly one value (the previous step's time): one counter
        increment per model and one histogram update per distinct gap, instead of four updates a token."""
        tokens: dict[str, int] = {}
        gaps: dict[tuple[str, float], int] = {}
        last_token_time = self.last_token_time
        for out in outputs:
            model = self.label(out.adapter_id)
            if out.new_token_ids:
                tokens[model] = tokens.get(model, 0) + len(out.new_token_ids)
                last = last_token_time.get(out.request_id)
                if last is None:
                    self.series(model).ttft.observe(now - out.arrival_time)
                else:
                    key = (model, now - last)
                    gaps[key] = gaps.get(key, 0) + 1
                last_token_time[out.request_id] = now
            if out.finished:
                self._observe_finished(out, model, self.series(model), now)
        for model, n in tokens.items():
            self.series(model).generation_tokens.inc(n)
        for (model, gap), n in gaps.items():
            series = self.series(model)
            observe_many(series.itl, gap, n)
            observe_many(series.tpot, gap, n)

    def _observe_finished(self, out: RequestOutput, model: str, series: _ModelSeries, now: float) -> None:
        self.last_token_time.pop(out.request_id, None)
        reason = out.finish_reason.value if out.finish_reason is not None else "abort"
        self.success.labels(model, reason).inc()
        series.prompt_tokens.inc(out.num_prompt_tokens)
        series.req_prompt.observe(out.num_prompt_tokens)
        series.req_generation.observe(out.num_output_tokens)
        series.max_generation.observe(out.num_output_tokens)
        series.e2e.observe(now - out.arrival_time)
        ttft = None if out.first_token_time is None else out.first_token_time - out.arrival_time
        queued = None if out.first_scheduled_time is None else out.first_scheduled_time - out.arrival_time
        log_finished_request({
            "request_id": out.request_id, "model": model, "prompt_tokens": out.num_prompt_tokens,
            "output_tokens": out.num_output_tokens, "cached_tokens": out.num_cached_tokens,
            "queue_s": queued, "ttft_s": ttft, "e2e_s": now - out.arrival_time, "finish_reason": reason,
        })
        if out.first_scheduled_time is not None:
            series.queue.observe(out.first_scheduled_time - out.arrival_time)
            series.inference.observe(now - out.first_scheduled_time)
            if out.first_token_time is not None:
                series.prefill.observe(out.first_token_time - out.first_scheduled_time)
                series.decode.observe(now - out.first_token_time)
