"""The engine client a server runs, by --engine-mode: the engine in its own process (the default)
or in a thread of the server's."""

from __future__ import annotations

from sloth_serve.config import Config
from sloth_serve.engine.async_engine import AsyncEngine
from sloth_serve.engine.client import EngineClient
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.process_client import ProcessEngineClient


def engine_client(config: Config) -> EngineClient:
    if config.engine_mode == "thread":
        return AsyncEngine(lambda: LLMEngine(config))
    return ProcessEngineClient(config)
