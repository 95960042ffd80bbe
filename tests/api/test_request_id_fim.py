"""No model needed: x-request-id on every response (errors included), the FIM prompt builder on a
tokenizer given FIM tokens, /tokenizer_info's description of a tokenizer, and the Responses API
request's translation into a chat request."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from sloth_serve.api import create_app
from sloth_serve.api.errors import APIError
from sloth_serve.api.fim import FIM_TOKENS, fim_prompt, fim_token_ids
from sloth_serve.api.responses_protocol import ResponsesRequest
from sloth_serve.api.serving_tokenizer_info import describe
from sloth_serve.config import Config
from sloth_serve.loader import DEMO_MODEL


@pytest.fixture()
def client() -> TestClient:
    # Without `with`, the lifespan never starts: no model, only routing, middleware and errors.
    return TestClient(create_app(Config(max_request_bytes=1024, api_key=("k1",))))


def test_a_clients_request_id_is_echoed_on_errors(client: TestClient) -> None:
    r = client.post("/v1/completions", json={}, headers={"x-request-id": "abc-123"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "abc-123"
    big = client.post("/v1/completions", content=b"x" * 5000, headers={"Authorization": "Bearer k1", "x-request-id": "r2"})
    assert big.status_code == 413 and big.headers["x-request-id"] == "r2"


def test_without_a_client_id_each_response_gets_its_own(client: TestClient) -> None:
    first, second = client.get("/health"), client.get("/health")
    assert first.status_code == 503  # nothing loaded, and still the header
    assert len(first.headers["x-request-id"]) == 32 and first.headers["x-request-id"] != second.headers["x-request-id"]
    assert client.get("/no/such/route").headers["x-request-id"]


def test_an_unsafe_client_id_is_replaced(client: TestClient) -> None:
    r = client.get("/health", headers={"x-request-id": "a" * 300})
    assert r.headers["x-request-id"] != "a" * 300 and len(r.headers["x-request-id"]) == 32


def demo_tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


@pytest.mark.parametrize("family", FIM_TOKENS)
def test_fim_prompt_is_prefix_suffix_middle_around_the_texts(family: tuple[str, str, str]) -> None:
    tok = demo_tokenizer()
    assert fim_token_ids(tok) is None
    tok.add_special_tokens({"additional_special_tokens": list(family)})
    pre, suf, mid = (tok.convert_tokens_to_ids(t) for t in family)
    prefix, suffix = "def add(a, b):\n    ", "\n    return c"
    ids = fim_prompt(tok, prefix, suffix)
    plain_prefix, plain_suffix = tok.encode(prefix, add_special_tokens=False), tok.encode(suffix, add_special_tokens=False)
    assert ids == [pre, *plain_prefix, suf, *plain_suffix, mid]
    assert tok.decode(ids) == f"{family[0]}{prefix}{family[1]}{suffix}{family[2]}"


def test_fim_tokens_written_in_the_text_stay_text() -> None:
    tok = demo_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(FIM_TOKENS[0])})
    ids = fim_prompt(tok, "x<|fim_middle|>", "y")
    assert ids.count(tok.convert_tokens_to_ids("<|fim_middle|>")) == 1 and ids[-1] == tok.convert_tokens_to_ids("<|fim_middle|>")


def test_fim_without_fim_tokens_is_a_400_naming_suffix_and_the_reason() -> None:
    with pytest.raises(APIError) as err:
        fim_prompt(demo_tokenizer(), "a", "b")
    assert err.value.status_code == 400 and err.value.param == "suffix"
    assert "FIM tokens" in err.value.message and "<|fim_prefix|>" in err.value.message


def test_tokenizer_info_describes_class_config_and_template() -> None:
    tok = demo_tokenizer()
    info = describe(tok)
    json.dumps(info)  # JSON-ready, special tokens included
    assert info["tokenizer_class"] == type(tok).__name__
    assert info["chat_template"] == tok.chat_template
    assert all(k in info for k in ("bos_token", "eos_token", "pad_token", "unk_token"))  # lm-eval needs eos_token
    assert info["eos_token"] == tok.eos_token
    assert not any(k.endswith("_file") for k in info)


def test_responses_input_items_become_chat_messages() -> None:
    req = ResponsesRequest.model_validate({
        "instructions": "Be brief.", "max_output_tokens": 9, "parallel_tool_calls": False,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "42"},
            {"type": "reasoning", "summary": []},
        ],
    })
    chat = req.to_chat()
    assert chat.conversation() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    assert chat.max_completion_tokens == 9 and chat.parallel_tool_calls is False
    assert chat.tools is not None and chat.tools[0].function.name == "f"
    assert chat.response_format is not None and chat.response_format.json_schema is not None
    assert chat.tool_choice is not None and chat.tool_choice.function.name == "f"  # type: ignore[union-attr]
