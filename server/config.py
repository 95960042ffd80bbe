"""Every setting of sloth-serve in one frozen dataclass, built from CLI flags (server/cli.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.loader import DEMO_MODEL


@dataclass(frozen=True, slots=True)
class Config:
    # Model
    model: str = str(DEMO_MODEL)
    served_model_name: str | None = None  # name clients use in `model`; default: the folder's name
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    seed: int = 0
    # unsloth: FastLanguageModel.from_pretrained(load_in_4bit=True) + for_inference, weights adopted
    # in 4-bit; safetensors: the checkpoint's own 16-bit weights read directly (no quantization)
    load_format: str = "unsloth"
    merge_lora: str | None = None  # adapter folder merged into the base at load (16-bit result)
    # The base model's chat template (Jinja text, read from --chat-template's file or given inline);
    # also used by adapters whose folder has none of their own. None: the tokenizer's.
    chat_template: str | None = None
    # Engine
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: from kv_cache_memory_gb (CPU) or free GPU memory
    kv_cache_memory_gb: float = 1.0  # CPU only
    gpu_memory_utilization: float = 0.90
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # CUDA only: no CUDA graphs for decode steps
    warmup: bool = True  # CUDA only: compile the prefill kernels at startup (LLMEngine.warmup)
    sampler: str = "torch"  # "triton": kernels.triton_sampling on CUDA (slower where top-k / top-p are set)
    async_scheduling: bool = False  # queue decode step N+1 before reading step N's tokens (LLMEngine)
    cuda_graph_sizes: tuple[int, ...] = ()  # decode batch sizes to capture; default 1,2,4,8,16,32...
    # LoRA
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, folder) pairs
    lora_dirs: tuple[str, ...] = ()  # every adapter folder inside is servable by its folder name
    max_cpu_loras: int = 16  # adapters loaded from --lora-dir kept in host memory (LRU beyond)
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    max_loras: int = 4
    # The adapter slots' rank. None: the largest rank among the adapters known at start-up (--lora,
    # the folders in --lora-dir, --merge-lora), at least 16. Slots wider than their adapters cost
    # time: rank-16 adapters in rank-64 slots made a batch-64 8B step 10.7 instead of 9.0 ms (H200).
    max_lora_rank: int | None = None
    # HTTP server
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: tuple[str, ...] = ()
    max_queued_requests: int = 1024
    # Prompt tokens (each prompt once per choice) of admitted generation requests before new ones
    # get 503 + Retry-After; a request over the whole budget alone is a 400. None: twice the KV
    # cache's tokens (server/api/admission.py, set once the cache is sized); 0: unlimited.
    max_queued_tokens: int | None = None
    # Seconds from arrival to the end of generation, queue time included; a request's `timeout` may
    # shorten it. Past it the engine request is aborted: 408, or an SSE error event. None: no limit.
    request_timeout: float | None = None
    # Larger bodies get 413. None: what a prompt as long as the context allows needs, at most 16 MiB
    # (server/api/limits.py, derived once the model is loaded).
    max_request_bytes: int | None = None
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers
    log_level: str = "info"
    log_format: str = "text"  # text or json (one JSON object a line)
    access_log: bool = True  # uvicorn's line per HTTP request
    access_log_skip_paths: tuple[str, ...] = ("/health", "/metrics")  # probes: left out of the access log
    log_requests: bool = True  # the line per finished generation request (server/logs.py)
    shutdown_timeout: float = 30.0  # seconds a SIGTERM waits for in-flight requests to finish

    def __post_init__(self) -> None:
        if self.sampler not in ("torch", "triton"):
            raise ValueError(f"--sampler must be torch or triton; got {self.sampler!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"--block-size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"--max-num-batched-tokens must be at least 1; got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2; got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        if self.max_loras < 1 or (self.max_lora_rank is not None and self.max_lora_rank < 1):
            raise ValueError("--max-loras and --max-lora-rank must be at least 1")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"--log-format must be text or json; got {self.log_format}")
        if self.max_queued_tokens is not None and self.max_queued_tokens < 0:
            raise ValueError(f"--max-queued-tokens must be >= 0 (0: unlimited); got {self.max_queued_tokens}")
        if self.max_request_bytes is not None and self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes must be at least 1; got {self.max_request_bytes}")
        for flag, seconds in (("--header-timeout", self.header_timeout), ("--keep-alive-timeout", self.keep_alive_timeout)):
            if not 0 < seconds < math.inf:
                raise ValueError(f"{flag} must be a positive number of seconds; got {seconds}")
        if self.request_timeout is not None and not 0 < self.request_timeout < math.inf:
            raise ValueError(f"--request-timeout must be a positive number of seconds (or 0: none); got {self.request_timeout}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0; got {self.shutdown_timeout}")
        if self.max_cpu_loras < 1:
            raise ValueError(f"--max-cpu-loras must be at least 1; got {self.max_cpu_loras}")
        if self.load_format not in ("unsloth", "safetensors"):
            raise ValueError(f"--load-format must be unsloth or safetensors; got {self.load_format}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16; got {self.dtype}")
