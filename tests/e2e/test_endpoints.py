"""GET /v1/models, /health, /version and POST /tokenize, /detokenize."""

from __future__ import annotations

import httpx
from live_server import BASE_MODEL, LiveServer
from openai import OpenAI

from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL


def test_models_lists_base_and_adapter_with_parent(client: OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {BASE_MODEL, "upper"}
    base, upper = models[BASE_MODEL].model_dump(), models["upper"].model_dump()
    assert base["parent"] is None and base["root"] == str(DEMO_MODEL)
    assert upper["parent"] == BASE_MODEL and upper["root"] == str(DEMO_ADAPTER)
    assert base["max_model_len"] > 0
    assert client.models.retrieve("upper").id == "upper"


def test_health_reports_engine_state(server: LiveServer) -> None:
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    for key in ("kv_cache_usage", "num_running", "num_waiting", "num_free_blocks", "num_blocks"):
        assert key in body


def test_version(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_tokenize_then_detokenize_round_trips(server: LiveServer) -> None:
    text = "Return the JSON string, naïvely: é ✓"
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": text})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]}).json()
    assert back["prompt"] == text


def test_tokenize_messages_applies_chat_template(server: LiveServer, client: OpenAI) -> None:
    messages = [{"role": "user", "content": "What does `json.dumps` do?"}]
    body = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    r = client.chat.completions.create(model=BASE_MODEL, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.prompt_tokens == body["count"]


def test_tokenize_unknown_model_is_404(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
