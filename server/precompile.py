"""`sloth-serve --precompile-only ...`: fill the compile cache and exit, so that the server's first
real start reads its kernels instead of compiling them. For an init container (on the GPU node, with
the serving flags and the same cache volume) or an image build on a machine with the same GPU:
the engine is built in this process exactly as the server builds it (weights, CUDA graphs, the
warmup that compiles the prefill and sampling kernels), then the adapters named at start-up are
loaded, the first of which compiles the LoRA kernels. Triton keys its cache on the kernel source,
its constants, the GPU architecture and its own version: a cache filled on another GPU or release
is simply missed."""

from __future__ import annotations

import logging
from pathlib import Path

from . import compile_cache, startup_clock
from .compile_cache import CacheDir
from .config import Config
from .loader.prefetch import prefetch_weights
from .preflight import cuda_device_count, torch_cuda_build
from .startup_clock import startup_phase

logger = logging.getLogger(startup_clock.STARTUP_LOGGER)


def startup_adapters(config: Config) -> list[tuple[str, str]]:
    """(name, folder) of every --lora, else the first adapter folder of the --lora-dirs: one adapter
    compiles the LoRA kernels, since their sizes come from the slots (--max-lora-rank), not the adapter."""
    if config.lora_modules:
        return list(config.lora_modules)
    for root in map(Path, config.lora_dirs):
        folders = (
            sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file())
            if root.is_dir()
            else []
        )
        if folders:
            return [(folders[0].name, str(folders[0]))]
    return []


def nothing_to_compile(device: str) -> str | None:
    """Why this run has no kernel to compile (the CPU: the Triton kernels run in the interpreter
    there), asked of the driver without importing torch; None when it runs on a GPU."""
    if device == "cpu":
        return "the device is the CPU"
    if device == "auto":
        count, why = cuda_device_count()
        if count == 0:
            return f"--device auto runs on the CPU here ({why})"
        if torch_cuda_build() is None:
            return "--device auto runs on the CPU here (the installed torch is a CPU build)"
    return None


def precompile(config: Config, caches: list[CacheDir]) -> int:
    """Exit status: 0 once the kernels are compiled (or when there is nothing to compile)."""
    why = nothing_to_compile(config.device)
    if why is not None:
        logger.info(
            "precompile: %s, where the Triton kernels run in the interpreter: nothing to compile", why
        )
        return 0
    prefetch_weights(config.model)  # read into the page cache while torch is imported
    with startup_phase("import torch and the engine", "other"):
        from .engine.llm_engine import LLMEngine
        from .engine.loras import load_adapter
    engine = LLMEngine(config)  # weights, CUDA graphs, the warmup's kernels
    for adapter_id, (name, path) in enumerate(startup_adapters(config), start=1):
        weights = load_adapter(engine, name, path)
        engine.add_lora(adapter_id, weights)  # the first recaptures the graphs and compiles the LoRA kernels
    clock = startup_clock.current()
    logger.info("precompile: done, %s", startup_clock.summary_line(clock.totals(clock.elapsed())))
    logger.info("%s", compile_cache.describe(caches))
    return 0
