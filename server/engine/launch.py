"""The engine client a server runs, by --engine-mode: the engine in its own process (the default)
or in a thread of the server's."""

from __future__ import annotations

from ..config import Config
from .async_engine import AsyncEngine
from .client import EngineClient
from .llm_engine import LLMEngine
from .process_client import ProcessEngineClient


def engine_client(config: Config) -> EngineClient:
    if config.engine_mode == "thread":
        return AsyncEngine(lambda: LLMEngine(config))
    return ProcessEngineClient(config)
