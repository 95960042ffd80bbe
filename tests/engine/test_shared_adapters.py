"""Several front ends (--api-server-count) each register the --lora adapters under the same ids: the
engine loop loads an adapter once and answers the later loads of the same folder under the same id
with its rank, without replacing the weights requests may be running on. A different folder under
an id, or the id after its removal, still loads."""

from __future__ import annotations

from sloth_serve.config import Config
from sloth_serve.engine.engine_loop import EngineLoop
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.wire import AddLora, Event, RemoveLora, Reply
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL


def test_the_same_adapter_loaded_again_under_its_id_is_kept() -> None:
    engine = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", device="cpu", dtype="float32",
                              num_kv_blocks=32, block_size=8))
    events: list[Event] = []
    loop = EngineLoop(engine, events.append)

    def load(call_id: int, adapter_id: int, name: str) -> Reply:
        loop.load_lora(AddLora(call_id, adapter_id, name, str(DEMO_ADAPTER)))  # reads the files, queues the rest
        loop._apply_commands(block=False)
        reply = events.pop()
        assert isinstance(reply, Reply) and reply.call_id == call_id and reply.error is None, reply
        return reply

    first = load(0, 1, "upper")
    weights = engine.lora_manager.adapters[1]
    second = load(1, 1, "upper")  # another front end's load of the same folder
    assert second.result == first.result and first.result is not None
    assert engine.lora_manager.adapters[1] is weights  # not replaced
    load(2, 1, "shout")  # another adapter under the id: loaded in its place
    assert engine.lora_manager.adapters[1] is not weights
    loop.put(RemoveLora(3, 1))
    loop._apply_commands(block=False)
    assert 1 not in engine.lora_manager.adapters
    load(4, 1, "shout")  # removed: loads again
    assert 1 in engine.lora_manager.adapters
