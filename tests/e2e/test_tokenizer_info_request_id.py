"""Against the live demo server: `GET /tokenizer_info` (vLLM's shape, per model), `x-request-id` on
whole, streamed and error responses, and `suffix` refused with the reason for a model without FIM
tokens."""

from __future__ import annotations

import httpx
from live_server import BASE_MODEL, LiveServer
from transformers import AutoTokenizer

from sloth_serve.loader import DEMO_MODEL


def test_tokenizer_info_has_the_class_config_and_chat_template(server: LiveServer) -> None:
    r = httpx.get(f"{server.url}/tokenizer_info", timeout=30)
    assert r.status_code == 200, r.text
    info, tok = r.json(), AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    assert info["tokenizer_class"] == type(tok).__name__
    assert info["chat_template"] == tok.chat_template
    assert info.get("eos_token") == tok.eos_token
    assert info.get("model_max_length") == tok.model_max_length


def test_tokenizer_info_per_model_and_unknown_model_404(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/tokenizer_info", params={"model": "upper"}, timeout=30).status_code == 200
    r = httpx.get(f"{server.url}/tokenizer_info", params={"model": "nope"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_request_id_is_echoed_on_whole_streamed_and_error_responses(server: LiveServer) -> None:
    body = {"model": BASE_MODEL, "prompt": "Hello", "max_tokens": 2}
    whole = httpx.post(f"{server.url}/v1/completions", json=body, headers={"x-request-id": "whole-1"}, timeout=60)
    assert whole.status_code == 200 and whole.headers["x-request-id"] == "whole-1"
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                      headers={"x-request-id": "stream-1"}, timeout=60) as streamed:
        assert streamed.status_code == 200 and streamed.headers["x-request-id"] == "stream-1"
        assert "[DONE]" in streamed.read().decode()
    bad = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": -1}, headers={"x-request-id": "e-1"},
                     timeout=60)
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "e-1"
    generated = httpx.get(f"{server.url}/v1/models", timeout=30).headers["x-request-id"]
    assert len(generated) == 32


def test_suffix_without_fim_tokens_is_a_400_with_the_reason(server: LiveServer) -> None:
    body = {"model": BASE_MODEL, "prompt": "def f(", "suffix": "return x", "max_tokens": 4}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "suffix" and "FIM tokens" in err["message"]
    # An empty suffix asks for no fill-in-the-middle: a plain completion.
    assert httpx.post(f"{server.url}/v1/completions", json={**body, "suffix": ""}, timeout=60).status_code == 200
