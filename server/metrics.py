"""Prometheus metrics, named and bucketed as vLLM's where vLLM has them (`vllm:*`), so existing
dashboards and autoscalers work unchanged; figures vLLM lacks are `sloth:*`.

The engine thread calls `on_step` once a step with what the step did; nothing here blocks on the
GPU (the forward time comes from CUDA events of the previous step)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from server.engine import stalls
from server.engine.llm_engine import RequestOutput
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.logs import log_finished_request

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


class StallCollector(Collector):
    """What stopped every request at once while serving (server/engine/stalls.py), read at scrape time."""

    def collect(self):  # type: ignore[no-untyped-def]
        yield CounterMetricFamily("sloth:kernel_compiles_while_serving",
                                  "Kernel variants compiled after the warmup; each held up its step.",
                                  value=stalls.compiles_while_serving)
        yield CounterMetricFamily("sloth:slow_gc_pauses",
                                  f"Garbage collections of {stalls.GC_REPORT_S}s or longer while serving "
                                  "(every thread waited).", value=stalls.slow_collections)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, model_name_of: Callable[[int], str]) -> None:
        self.registry = registry
        self._model_name_of = model_name_of
        self._labels: dict[int, str] = {}
        r = registry
        m = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", m, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               [*m, "finished_reason"], registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Sequences preempted for lack of KV blocks.", registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", m,
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.", m,
                               buckets=REQUEST_BUCKETS, registry=r)
        self.prefill = Histogram("vllm:request_prefill_time_seconds", "First scheduled to first token.", m,
                                 buckets=REQUEST_BUCKETS, registry=r)
        self.decode = Histogram("vllm:request_decode_time_seconds", "First token to finish.", m,
                                buckets=REQUEST_BUCKETS, registry=r)
        self.req_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", m,
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.req_generation = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", m,
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.step_tokens = Histogram("vllm:iteration_tokens_total", "Tokens computed per engine step.",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.forward_time = Histogram("sloth:step_forward_time_seconds",
                                      "Device time of one forward pass (CUDA events; wall time on CPU).",
                                      buckets=STEP_BUCKETS, registry=r)
        self.gpu_used = Gauge("sloth:gpu_memory_used_bytes", "GPU memory allocated by tensors.", registry=r)
        self.gpu_reserved = Gauge("sloth:gpu_memory_reserved_bytes", "GPU memory reserved by the allocator.",
                                  registry=r)
        self.adapters = Gauge("sloth:loaded_adapters", "LoRA adapters registered.", registry=r)
        r.register(StallCollector())
        self.last_token_time: dict[str, float] = {}
        self._prefix_seen = (0, 0)

    def label(self, adapter_id: int) -> str:
        name = self._labels.get(adapter_id)
        if name is None:
            name = self._model_name_of(adapter_id) if len(self._labels) < MAX_MODEL_LABELS else "other"
            self._labels[adapter_id] = name
        return name

    def forget_adapter(self, adapter_id: int) -> None:
        self._labels.pop(adapter_id, None)

    def on_step(
        self,
        scheduler: Scheduler,
        batch: ScheduledBatch | None,
        outputs: list[RequestOutput],
        forward_seconds: float | None,
        now: float | None = None,
    ) -> None:
        now = time.monotonic() if now is None else now  # the step's end: observation may come later
        bm = scheduler.block_manager
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.kv_usage.set(bm.usage)
        if batch is not None and not batch.is_empty:
            self.step_tokens.observe(batch.num_tokens)
            if batch.num_preempted:
                self.preemptions.inc(batch.num_preempted)
        if forward_seconds is not None:
            self.forward_time.observe(forward_seconds)
        self._sync_prefix_counters(bm.num_prefix_queries, bm.num_prefix_hits)
        for out in outputs:
            self._observe_output(out, self.label(out.adapter_id), now)

    def _sync_prefix_counters(self, queries: int, hits: int) -> None:
        # The block manager keeps running totals; counters move forward by the difference.
        seen_q, seen_h = self._prefix_seen
        if queries > seen_q:
            self.prefix_queries.inc(queries - seen_q)
        if hits > seen_h:
            self.prefix_hits.inc(hits - seen_h)
        self._prefix_seen = (queries, hits)

    def _observe_output(self, out: RequestOutput, model: str, now: float) -> None:
        if out.new_token_ids:
            self.generation_tokens.labels(model).inc(len(out.new_token_ids))
            last = self.last_token_time.get(out.request_id)
            if last is None:
                self.ttft.labels(model).observe(now - out.arrival_time)
            else:
                self.itl.labels(model).observe(now - last)
            self.last_token_time[out.request_id] = now
        if not out.finished:
            return
        self.last_token_time.pop(out.request_id, None)
        reason = out.finish_reason.value if out.finish_reason is not None else "abort"
        self.success.labels(model, reason).inc()
        self.prompt_tokens.labels(model).inc(out.num_prompt_tokens)
        self.req_prompt.labels(model).observe(out.num_prompt_tokens)
        self.req_generation.labels(model).observe(out.num_output_tokens)
        self.e2e.labels(model).observe(now - out.arrival_time)
        ttft = None if out.first_token_time is None else out.first_token_time - out.arrival_time
        queued = None if out.first_scheduled_time is None else out.first_scheduled_time - out.arrival_time
        log_finished_request({
            "request_id": out.request_id, "model": model, "prompt_tokens": out.num_prompt_tokens,
            "output_tokens": out.num_output_tokens, "cached_tokens": out.num_cached_tokens,
            "queue_s": queued, "ttft_s": ttft, "e2e_s": now - out.arrival_time, "finish_reason": reason,
        })
        if out.first_scheduled_time is not None:
            self.queue.labels(model).observe(out.first_scheduled_time - out.arrival_time)
            if out.first_token_time is not None:
                self.prefill.labels(model).observe(out.first_token_time - out.first_scheduled_time)
                self.decode.labels(model).observe(now - out.first_token_time)

    def sample_gpu_memory(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                self.gpu_used.set(torch.cuda.memory_allocated())
                self.gpu_reserved.set(torch.cuda.memory_reserved())
        except Exception:  # metrics never take the server down
            pass
