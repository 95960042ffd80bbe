"""The engine's start-up phases: what it timed is on its EngineInfo (what an engine process sends the
front end), each reading phase once, and a front end adds an engine process's phases to its own clock
exactly once, from Ready and from adapter replies."""

from __future__ import annotations

from sloth_serve import startup_clock
from sloth_serve.config import Config
from sloth_serve.engine.engine_loop import engine_info
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.process_client import ProcessEngineClient
from sloth_serve.engine.wire import Reply
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.startup_clock import Phase


def test_engine_info_carries_the_phases_the_engine_timed() -> None:
    clock = startup_clock.begin()
    before = clock.mark()
    engine = LLMEngine(Config(model=str(DEMO_MODEL), device="cpu", load_format="safetensors", num_kv_blocks=64))
    phases = engine_info(engine).startup_phases
    assert phases == engine.startup_phases == clock.since(before)
    assert [p.kind for p in phases] == ["load", "other"]  # the safetensors read; the KV cache (no graphs on CPU)
    assert phases[0].name == "read base's safetensors into the model" and phases[0].seconds > 0
    assert phases[1].name.startswith("allocate the KV cache (64 blocks)")


def test_a_front_end_adds_an_engine_process_phases_once() -> None:
    clock = startup_clock.begin()
    client = ProcessEngineClient(Config(model=str(DEMO_MODEL), device="cpu"))  # not spawned
    try:
        timed = (Phase("capture CUDA graphs with the LoRA kernels", "graphs", 0.5),)
        client._dispatch(Reply(7, result=16, startup_phases=timed))
        client._dispatch(Reply(8, result=None))
    finally:
        client._close()
    assert clock.phases == list(timed)
    assert clock.totals(elapsed=2.0)["graphs"] == 0.5
