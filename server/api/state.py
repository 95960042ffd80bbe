"""The server's runtime: starts the engine (its own process, or a thread) in the background, so /health
can answer 503 while the model loads, then holds the engine client, tokenizers and adapters for the
request handlers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from .. import startup_clock
from ..adapters import AdapterRegistry, dynamic_ids_from
from ..config import Config
from ..engine import stalls
from ..engine.client import AdapterNamed, AdapterNews, AdapterWithdrawnError, EngineClient, EngineInfo
from ..engine.grammar import make_compiler
from ..engine.launch import engine_client
from ..metrics import EngineMetrics
from ..vision_families import processor_for
from ..vision_processor import image_limits
from .admission import Admission
from .errors import APIError
from .limits import fit_limits
from .runtime import Runtime
from .tokenizers import TokenizerRegistry, base_entry

logger = logging.getLogger(__name__)
PUBLISH_S = 1.0  # several front ends: how often each writes its own gauges for the others' scrapes


def base_model_id(config: Config) -> str:
    return config.served_model_name or Path(config.model).name


class ServerState:
    def __init__(self, config: Config, engine: EngineClient | None = None, front_end: int = 0) -> None:
        self.config = config
        self.front_end = front_end  # this process's number among the --api-server-count front ends
        self.base_model_id = base_model_id(config)
        self.admission = Admission(config.max_queued_requests, config.max_queued_tokens)
        self.engine = engine  # made when loading starts unless given (to stop it at shutdown)
        self.runtime: Runtime | None = None
        self.load_error: str | None = None
        self.on_fatal: Callable[[], None] | None = None  # set by the CLI: stop the server
        self._loading: asyncio.Task[None] | None = None
        self._closed = False
        self.draining = False  # SIGTERM received: finish what runs, admit nothing new
        self.drain_deadline = 0.0
        self.adapter_locks: dict[str, asyncio.Lock] = {}
        self.registry = CollectorRegistry()  # per app, so several servers can live in one process
        self.clock = startup_clock.claim()  # the CLI's (from the process's start), or a new one
        # Every front end sees every step's record; one counts the engine's steps (the others' would
        # add the same steps again when /metrics sums the front ends).
        self.metrics = EngineMetrics(self.registry, self._model_name_of, config.max_loras, self._stall_counts,
                                     count_steps=front_end == 0)
        self.shared_metrics = config.api_server_count > 1  # /metrics sums the front ends' series
        self._tokens_in_flight = self.admission.export(self.registry, self.shared_metrics)
        self._scrape_registry: CollectorRegistry | None = None
        self._publisher: asyncio.Task[None] | None = None
        # What other front ends load and unload (--api-server-count), applied in order by one task.
        self._adapter_news: asyncio.Queue[AdapterNews] = asyncio.Queue()
        self._news_reader: asyncio.Task[None] | None = None

    def _model_name_of(self, adapter_id: int) -> str:
        """The `model` a client names for this engine adapter id (the metrics' model_name label)."""
        runtime = self.runtime
        if adapter_id and runtime is not None:
            for adapter in runtime.adapters:
                if adapter.adapter_id == adapter_id:
                    return adapter.name
        return self.base_model_id if not adapter_id else f"adapter-{adapter_id}"

    def _stall_counts(self) -> tuple[int, int]:
        """Kernel compiles and slow collections: this process's, and the engine process's if it has one."""
        compiles, collections = stalls.compiles_while_serving, stalls.slow_collections
        stats = self.engine.stats if self.engine is not None and self.config.engine_mode == "process" else None
        if stats is not None:
            compiles, collections = compiles + stats.kernel_compiles, collections + stats.slow_gc_pauses
        return compiles, collections

    def begin_drain(self, timeout: float) -> None:
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + timeout
            logger.info("draining: %d requests in flight, up to %.0fs", self.admission.num_in_flight, timeout)

    @property
    def drained(self) -> bool:
        return self.draining and (self.admission.num_in_flight == 0 or time.monotonic() >= self.drain_deadline)

    @property
    def engine_dead(self) -> str | None:
        """Why the engine stopped while serving, or None."""
        return self.engine.dead_reason if self.runtime is not None and self.engine is not None else None

    @property
    def status(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self.engine_dead is not None:
            return "dead"
        if self.draining:
            return "draining"
        if self.runtime is None:
            return "loading"
        return "ok"

    def start_loading(self) -> None:
        self._loading = asyncio.create_task(self._load(), name="sloth-load")
        if self.shared_metrics:
            self._publisher = asyncio.create_task(self._publish_every(PUBLISH_S), name="sloth-metrics")

    def publish_metrics(self) -> None:
        """This front end's own figures (status, requests in flight, adapters) into its gauges."""
        runtime = self.runtime
        self.metrics.adapters.set(0 if runtime is None else len(runtime.adapters.by_name))
        self.metrics.set_server(self.status, self.admission.num_in_flight, self.admission.limit)
        if self.shared_metrics:
            self._tokens_in_flight.set(self.admission.num_tokens_in_flight)

    async def _publish_every(self, seconds: float) -> None:
        """Several front ends: a scrape reaches one of them, and reads the others' figures from their
        files, so each keeps its own current there (never older than `seconds`)."""
        while True:
            self.publish_metrics()
            await asyncio.sleep(seconds)

    def scrape_registry(self) -> CollectorRegistry:
        """What GET /metrics exports: this process's registry, or with several front ends the sum of
        theirs (prometheus_client's multiprocess files) and this one's scrape-time collectors."""
        if not self.shared_metrics:
            return self.registry
        if self._scrape_registry is None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            for collector in self.metrics.collectors:
                registry.register(collector)
            self._scrape_registry = registry
        return self._scrape_registry

    async def _load(self) -> None:
        config = self.config
        engine = self.engine = self.engine or engine_client(config)
        engine.on_step = self.metrics.on_step
        try:
            info = await engine.start()
            with startup_clock.startup_phase("front end: tokenizer, chat template, grammar vocabulary", "other"):
                runtime = await asyncio.to_thread(self._runtime, engine, info)
            self.runtime = runtime  # set before the adapters: their ids are read by the metrics' labels
            for name, path in config.lora_modules:
                if name == self.base_model_id:
                    raise ValueError(f"--lora {name}=... uses the base model's name; give the adapter another")
                try:
                    await runtime.load_adapter(name, path, pinned=True, at_startup=True)
                except AdapterWithdrawnError as exc:  # unloaded through another API server meanwhile
                    logger.warning("%s: not served", exc)
            # What start-up made stays for the life of the process: out of the collector's reach,
            # a full collection no longer stops every thread for most of a second under load.
            stalls.watch_gc()
            logger.info("start-up heap frozen: %d objects left out of garbage collection", stalls.freeze_heap())
            stalls.serving()
        except Exception as exc:
            self.runtime = None
            # One line; the traceback at --log-level debug (start-up errors read like the CLI's).
            logger.error("loading %s failed: %s: %s", config.model, type(exc).__name__, exc,
                         exc_info=logger.isEnabledFor(logging.DEBUG))
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        if self._closed:
            return
        engine.on_death = self._engine_died
        if config.api_server_count > 1:
            self._news_reader = asyncio.create_task(self._read_adapter_news(runtime), name="sloth-adapter-news")
            engine.listen_to_adapter_news(self._adapter_news.put_nowait)
        # The defaults of --max-queued-tokens and --max-request-bytes need the model.
        fit_limits(config, runtime, self.admission)
        logger.info("ready to serve: %s (engine in a %s)", ", ".join([self.base_model_id, *(a.name for a in runtime.adapters)]),
                    config.engine_mode)
        self._report_startup()

    def _report_startup(self) -> None:
        """The start-up's summary line (`start-up: ready in ...`, grep-able with the phase lines) and gauge."""
        totals = self.clock.totals(self.clock.elapsed())
        self.metrics.set_startup(totals)
        logging.getLogger(startup_clock.STARTUP_LOGGER).info(
            "start-up: %s", startup_clock.summary_line(totals),
            extra={"fields": {"startup_seconds": {k: round(v, 3) for k, v in totals.items()}}})

    def _runtime(self, engine: EngineClient, info: EngineInfo) -> Runtime:
        """The front end's half of loading (a worker thread): tokenizers and the grammar compiler."""
        # The base's tokenizer, or an adapter folder's given as --model; --chat-template over it.
        adapter_folder = Path(info.adapter_folder) if info.adapter_folder is not None else None
        base = base_entry(Path(info.folder), info.eos_token_ids, adapter_folder,
                          self.config.chat_template)
        adapters = AdapterRegistry(self.config.lora_dirs, self.config.max_cpu_loras,
                                   dynamic_ids_from(engine.front_end_index))
        # The vocabulary, now rather than on the first constrained request.
        grammar, grammar_error = make_compiler(base.tokenizer, info.vocab_size, info.eos_token_ids)
        vision = processor_for(Path(info.folder), image_limits(self.config))
        return Runtime(engine, info, base.tokenizer, adapters, base.token_texts, self.base_model_id,
                       TokenizerRegistry(base, adapters), grammar, grammar_error, vision, self.config.reasoning_parser,
                       self.config.tool_call_parser)

    async def _read_adapter_news(self, runtime: Runtime) -> None:
        while True:
            news = await self._adapter_news.get()
            try:
                if isinstance(news, AdapterNamed):
                    await runtime.adopt_adapter(news)
                    logger.info("adapter %s loaded through another API server: serving it here too", news.name)
                else:
                    runtime.forget_adapter(news)
                    logger.info("adapter %s unloaded through another API server", news.name)
            except Exception as exc:  # its folder became unreadable since: the name is not served here
                logger.error("adapter %s, loaded through another API server, cannot be served here: %s: %s",
                             news.name, type(exc).__name__, exc)

    def _engine_died(self, reason: str) -> None:
        """The engine process died while serving: 503s from now on, and the server exits non-zero so
        an orchestrator restarts it. A thread engine's fatal error keeps the server up, answering 503."""
        if self.config.engine_mode == "process" and self.on_fatal is not None:
            # A moment for the streams just ended to send their error events, then stop.
            asyncio.get_running_loop().call_later(1.0, self.on_fatal)

    def _fail(self, message: str) -> None:
        self.load_error = message
        if self.on_fatal is not None:
            self.on_fatal()

    async def shutdown(self) -> None:
        self._closed = True
        for task in (self._publisher, self._news_reader):
            if task is not None:
                task.cancel()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self.engine is not None:
            await self.engine.stop()

    def ready(self) -> Runtime:
        """The runtime, or a 503 the client can retry."""
        dead = self.engine_dead
        if dead is not None:
            raise APIError(f"the engine has stopped: {dead}", 503)
        if self.draining:
            raise APIError("the server is shutting down; retry on another replica", 503,
                           headers={"Retry-After": "1"})
        runtime = self.runtime
        if runtime is None:
            if self.load_error is not None:
                raise APIError(f"the model failed to load: {self.load_error}", 503)
            raise APIError("the model is still loading; retry shortly", 503, headers={"Retry-After": "5"})
        return runtime

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "model": self.base_model_id}
        if self.load_error is not None:
            body["reason"] = self.load_error
        stats = self.engine.stats if self.runtime is not None and self.engine is not None else None
        if stats is not None:  # the newest step's record: a step behind at most
            body.update(
                kv_cache_usage=stats.kv_cache_usage,
                num_free_blocks=stats.num_free_blocks,
                num_blocks=stats.num_blocks,
                num_running=stats.num_running,
                num_waiting=stats.num_waiting,
                num_requests_in_flight=self.admission.num_in_flight,
            )
        if self.engine_dead is not None:
            body["reason"] = self.engine_dead
        return body


def state_of(request: Request) -> ServerState:
    """The app's state. The generation endpoints (most requests) call this instead of taking
    StateDep: FastAPI solves a dependency on every request, ~50 us of the loop's time on a dev VM."""
    state: ServerState = request.app.state.server
    return state


async def get_state(request: Request) -> ServerState:
    """Async so FastAPI calls it on the loop: a plain function dependency costs every request a hop
    to its thread pool and back."""
    return state_of(request)


StateDep = Annotated[ServerState, Depends(get_state)]
