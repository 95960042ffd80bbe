"""The server's runtime: loads the model in a background thread (so /health can answer 503 while
it loads), then holds the engine, tokenizer and adapters for the request handlers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from server.adapters import AdapterRegistry
from server.api.admission import Admission
from server.api.errors import APIError
from server.api.limits import fit_limits
from server.api.logprobs import TokenTexts
from server.api.tokenizers import TokenizerRegistry, base_entry
from server.config import Config
from server.engine import stalls
from server.engine.async_engine import AsyncEngine
from server.engine.llm_engine import LLMEngine
from server.metrics import EngineMetrics
from server.vision_processor import VisionProcessor, image_limits

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Runtime:
    """Everything a request needs once the model is loaded."""

    engine: LLMEngine
    async_engine: AsyncEngine
    tokenizer: Any
    adapters: AdapterRegistry
    token_texts: TokenTexts
    base_model_id: str
    tokenizers: TokenizerRegistry  # per model: the tokenizer, chat template and EOS ids its requests use
    vision: VisionProcessor | None = None  # image-text models: images in chat messages become engine inputs
    reasoning_parser: str = "auto"  # --reasoning-parser / --tool-call-parser (server/api/output_reader.py)
    tool_call_parser: str = "auto"

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return int(self.engine.loaded.model.config.vocab_size)

    def check_fits_cache(self, num_prompt_tokens: int, param: str) -> None:
        """400 for a prompt the whole KV cache could not hold (the engine would fail it)."""
        blocks = self.engine.block_manager
        capacity = blocks.num_blocks * blocks.block_size
        if num_prompt_tokens + 1 > capacity:
            raise APIError(
                f"the prompt has {num_prompt_tokens} tokens but the KV cache holds only {capacity} "
                "(--num-kv-blocks x --block-size); shorten the prompt or give the server a larger cache",
                400,
                param=param,
            )


def base_model_id(config: Config) -> str:
    return config.served_model_name or Path(config.model).name


class ServerState:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.base_model_id = base_model_id(config)
        self.admission = Admission(config.max_queued_requests, config.max_queued_tokens)
        self.runtime: Runtime | None = None
        self.load_error: str | None = None
        self.on_fatal: Callable[[], None] | None = None  # set by the CLI: stop the server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loader: threading.Thread | None = None
        self._closed = False
        self.draining = False  # SIGTERM received: finish what runs, admit nothing new
        self.drain_deadline = 0.0
        self.adapter_locks: dict[str, asyncio.Lock] = {}
        self.registry = CollectorRegistry()  # per app, so several servers can live in one process
        self.metrics = EngineMetrics(self.registry, self._model_name_of, config.max_loras)
        self.admission.export(self.registry)

    def _model_name_of(self, adapter_id: int) -> str:
        """The `model` a client names for this engine adapter id (the metrics' model_name label)."""
        runtime = self.runtime
        if adapter_id and runtime is not None:
            for adapter in runtime.adapters:
                if adapter.adapter_id == adapter_id:
                    return adapter.name
        return self.base_model_id if not adapter_id else f"adapter-{adapter_id}"

    def begin_drain(self, timeout: float) -> None:
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + timeout
            logger.info("draining: %d requests in flight, up to %.0fs", self.admission.num_in_flight, timeout)

    @property
    def drained(self) -> bool:
        return self.draining and (self.admission.num_in_flight == 0 or time.monotonic() >= self.drain_deadline)

    @property
    def status(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self.draining:
            return "draining"
        if self.runtime is None:
            return "loading"
        if self.runtime.async_engine.dead_reason is not None:
            return "dead"
        return "ok"

    def start_loading(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loader = threading.Thread(target=self._load, name="sloth-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            engine = LLMEngine(self.config)
            engine.observer = self.metrics
            # The base's tokenizer, or an adapter folder's given as --model; --chat-template over it.
            loaded = engine.loaded
            base = base_entry(loaded.folder, engine.eos_token_ids, loaded.adapter_folder, self.config.chat_template)
            tokenizer = base.tokenizer
            # The grammar compiler needs the vocabulary: give it now, not on the first constrained request.
            engine.runner.sampler.set_tokenizer(tokenizer, engine.loaded.model.config.vocab_size, engine.eos_token_ids)
            adapters = AdapterRegistry(engine, self.config.lora_dirs, self.config.max_cpu_loras)
            tokenizers = TokenizerRegistry(base, adapters)
            vision = VisionProcessor.from_folder(loaded.folder, image_limits(self.config))
            for name, path in self.config.lora_modules:
                if name == self.base_model_id:
                    raise ValueError(f"--lora {name}=... uses the base model's name; give the adapter another")
                adapter = adapters.register(name, path)
                tokenizers.put(adapter.adapter_id, tokenizers.prepare(path, name))
            # What start-up made stays for the life of the process: out of the collector's reach,
            # a full collection no longer stops every thread for most of a second under load.
            stalls.watch_gc()
            logger.info("start-up heap frozen: %d objects left out of garbage collection", stalls.freeze_heap())
            stalls.serving()
        except Exception as exc:
            # One line; the traceback at --log-level debug (start-up errors read like the CLI's).
            logger.error("loading %s failed: %s: %s", self.config.model, type(exc).__name__, exc,
                         exc_info=logger.isEnabledFor(logging.DEBUG))
            self._call_on_loop(self._fail, f"{type(exc).__name__}: {exc}")
            return
        self._call_on_loop(self._ready, engine, tokenizers, adapters, vision)

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the server stopped while the model was loading
            logger.info("server stopped before the model finished loading")

    def _ready(self, engine: LLMEngine, tokenizers: TokenizerRegistry, adapters: AdapterRegistry,
               vision: VisionProcessor | None = None) -> None:
        if self._closed:
            return
        async_engine = AsyncEngine(engine)
        async_engine.start()  # needs the running loop: that is why this runs on it
        names = [self.base_model_id, *(a.name for a in adapters)]
        base = tokenizers.base
        self.runtime = Runtime(engine, async_engine, base.tokenizer, adapters, base.token_texts, self.base_model_id,
                               tokenizers, vision, self.config.reasoning_parser,
                               self.config.tool_call_parser)
        fit_limits(self)  # the defaults of --max-queued-tokens and --max-request-bytes need the model
        logger.info("ready to serve: %s", ", ".join(names))

    def _fail(self, message: str) -> None:
        self.load_error = message
        if self.on_fatal is not None:
            self.on_fatal()

    async def shutdown(self) -> None:
        self._closed = True
        if self.load_error is not None and self._loader is not None:
            # A failed load's thread may still be freeing its tensors: the process exiting under it
            # aborted (SIGABRT, "terminate called without an active exception").
            await asyncio.to_thread(self._loader.join, 30)
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.async_engine.shutdown)

    def ready(self) -> Runtime:
        """The runtime, or a 503 the client can retry."""
        if self.draining:
            raise APIError("the server is shutting down; retry on another replica", 503,
                           headers={"Retry-After": "1"})
        runtime = self.runtime
        if runtime is None:
            if self.load_error is not None:
                raise APIError(f"the model failed to load: {self.load_error}", 503)
            raise APIError("the model is still loading; retry shortly", 503, headers={"Retry-After": "5"})
        if runtime.async_engine.dead_reason is not None:
            raise APIError(f"the engine has stopped: {runtime.async_engine.dead_reason}", 503)
        return runtime

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "model": self.base_model_id}
        if self.load_error is not None:
            body["reason"] = self.load_error
        runtime = self.runtime
        if runtime is not None:
            # Plain int reads of engine-thread state: racy by a step at most, fine for monitoring.
            scheduler = runtime.engine.scheduler
            blocks = runtime.engine.block_manager
            body.update(
                kv_cache_usage=blocks.usage,
                num_free_blocks=blocks.num_free_blocks,
                num_blocks=blocks.num_blocks,
                num_running=len(scheduler.running),
                num_waiting=len(scheduler.waiting),
                num_requests_in_flight=self.admission.num_in_flight,
            )
            if runtime.async_engine.dead_reason is not None:
                body["reason"] = runtime.async_engine.dead_reason
        return body


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


StateDep = Annotated[ServerState, Depends(get_state)]
