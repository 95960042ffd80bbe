"""Helpers for the deployment-file tests: paths, the metric names the server exports, a small
Dockerfile parser, YAML loading, and finding a console-script tool."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# Flags the manifests use that the server is specified to have but may not have yet (issue 8:
# colleagues add the SIGTERM drain). A check that meets one of these unknown skips instead of failing.
PENDING_FLAGS = frozenset({"--shutdown-timeout"})

# What GET /metrics exposes (server/metrics.py): name -> Prometheus type. Counters are exposed with
# `_total`, histograms as `_bucket` / `_sum` / `_count`.
EXPORTED_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:gpu_cache_usage_perc": "gauge",  # vLLM's deprecated name, still queried by its dashboard
    "vllm:time_per_output_token_seconds": "histogram",  # ditto
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_max_num_generation_tokens": "histogram",
    "vllm:iteration_tokens_total": "histogram",
    "vllm:lora_requests_info": "gauge",
    "sloth:http_requests": "counter",
    "sloth:server_status": "gauge",
    "sloth:num_requests_in_flight": "gauge",
    "sloth:max_queued_requests": "gauge",
    "sloth:loaded_adapters": "gauge",
    "sloth:step_forward_time_seconds": "histogram",
    "sloth:gpu_memory_used_bytes": "gauge",
    "sloth:gpu_memory_reserved_bytes": "gauge",
    "sloth:kernel_compiles_while_serving": "counter",
    "sloth:slow_gc_pauses": "counter",
    "sloth:state_slots_in_use": "gauge",
}


def exposed_series_names() -> set[str]:
    names: set[str] = set()
    for name, kind in EXPORTED_METRICS.items():
        if kind == "counter":
            names.add(f"{name}_total")
        elif kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY...
    args: str  # the rest of the instruction, continuation lines joined

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD / ENTRYPOINT / HEALTHCHECK CMD, else None."""
        text = self.args.split(" CMD ", 1)[1] if self.keyword == "HEALTHCHECK" else self.args
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None


@dataclass(frozen=True)
class Stage:
    name: str
    base: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass(frozen=True)
class Dockerfile:
    args: dict[str, str]  # ARG defaults, global and per stage
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse_dockerfile(text: str) -> Dockerfile:
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments may sit inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = re.sub(r"\s+", " ", rest).strip()
        if keyword == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            stages.append(Stage(name.strip(), image.strip(), []))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return Dockerfile(args, stages)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find_tool(name: str) -> str | None:
    """A console script on PATH or beside this interpreter (a venv's bin/ need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)
