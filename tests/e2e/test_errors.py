"""Every error is an OpenAI error body `{"error": {message, type, param, code}}` with the right
status: 400 (validation, unsupported fields, context length), 404, 401 and 503 (queue full)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
from live_server import API_KEY, BASE_MODEL, LiveServer
from openai import OpenAI

CHAT = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def post(server: LiveServer, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers(), timeout=30, **kwargs)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"stop": ""}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_invalid_chat_request_is_400_naming_the_field(server: LiveServer, change: dict, param: str) -> None:
    err = error_of(post(server, "/v1/chat/completions", {**CHAT, **change}), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_missing_field_is_400_not_422(server: LiveServer) -> None:
    err = error_of(post(server, "/v1/chat/completions", {"model": BASE_MODEL}), 400)
    assert err["param"] == "messages"


@pytest.mark.parametrize(("content", "content_type"), [(b"", None), (b"model=base&prompt=hi", None),
                                                     (b"[1]", "application/json")])
def test_a_body_that_is_not_a_json_object_is_400_saying_so(server: LiveServer, content: bytes,
                                                           content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {"content-type": "application/x-www-form-urlencoded"}
    err = error_of(httpx.post(f"{server.url}/v1/completions", content=content, headers=headers), 400)
    assert err["message"].startswith("the request body must be a JSON object") and err["param"] is None


def test_malformed_json_is_400(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    error_of(r, 400)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tool_choice", "required"),  # without tools
        ("functions", [{"name": "f"}]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
    ],
)
def test_unsupported_chat_field_is_400_naming_it(server: LiveServer, field: str, value: Any) -> None:
    err = error_of(post(server, "/v1/chat/completions", {**CHAT, field: value}), 400)
    assert err["param"] == field
    assert field in err["message"]


def test_unsupported_content_part_is_400(server: LiveServer) -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    err = error_of(post(server, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [audio]}]}), 400)
    assert err["param"] == "messages[0].content[0].type"
    # An image for the demo model, which takes text only: the part is named and why.
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    err = error_of(post(server, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [image]}]}), 400)
    assert err["param"] == "messages[0].content[0].image_url" and "text only" in err["message"]


@pytest.mark.parametrize(("field", "value"), [("suffix", "tail"), ("best_of", 3)])
def test_unsupported_completion_field_is_400_naming_it(server: LiveServer, field: str, value: Any) -> None:
    err = error_of(post(server, "/v1/completions", {"model": BASE_MODEL, "prompt": "a", field: value}), 400)
    assert err["param"] == field


def test_unknown_extra_fields_are_ignored(server: LiveServer) -> None:
    r = post(server, "/v1/chat/completions", {**CHAT, "some_future_field": 1})
    assert r.status_code == 200, r.text


def test_context_length_error_names_both_numbers(client: OpenAI, server: LiveServer) -> None:
    max_len = httpx.get(f"{server.base_url}/models").json()["data"][0]["max_model_len"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=max_len)
    err = info.value.response.json()["error"]
    prompt_tokens = int(err["message"].split("(")[1].split(" in the messages")[0])
    assert f"maximum context length is {max_len} tokens" in err["message"]
    assert f"you requested {prompt_tokens + max_len} tokens ({prompt_tokens} in the messages, {max_len} in the completion)" in err["message"]
    assert err["code"] == "context_length_exceeded"


def test_prompt_longer_than_context_is_400_without_max_tokens(server: LiveServer) -> None:
    err = error_of(post(server, "/v1/completions", {"model": BASE_MODEL, "prompt": [5] * 5000}), 400)
    assert "5000 in the prompt" in err["message"]


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    err = info.value.response.json()["error"]
    assert err["code"] == "model_not_found" and "no-such-model" in err["message"]


def test_unknown_route_is_404_openai_body(server: LiveServer) -> None:
    err = error_of(httpx.post(f"{server.url}/v1/nope", json={}), 404)
    assert "/v1/nope" in err["message"]


def test_missing_or_wrong_api_key_is_401(restricted_server: LiveServer) -> None:
    url = f"{restricted_server.base_url}/chat/completions"
    err = error_of(httpx.post(url, json=CHAT), 401)
    assert err["code"] == "invalid_api_key"
    error_of(httpx.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}), 401)
    error_of(httpx.get(f"{restricted_server.base_url}/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=restricted_server.base_url, api_key="wrong", max_retries=0).models.list()
    assert httpx.post(url, json=CHAT, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_health_and_version_need_no_api_key(restricted_server: LiveServer) -> None:
    assert httpx.get(f"{restricted_server.url}/health").status_code == 200
    assert httpx.get(f"{restricted_server.url}/version").status_code == 200


def test_full_queue_is_503_with_retry_after_then_recovers(restricted_server: LiveServer) -> None:
    headers = restricted_server.headers()
    long_body = {**CHAT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    url = f"{restricted_server.base_url}/chat/completions"
    with httpx.stream("POST", url, json=long_body, headers=headers, timeout=60) as long_stream:
        assert long_stream.status_code == 200
        lines = long_stream.iter_lines()  # keep it: a dropped iterator closes the connection
        next(lines)  # the request is in flight
        r = httpx.post(url, json=CHAT, headers=headers)
        err = error_of(r, 503)
        assert int(r.headers["retry-after"]) >= 1
        assert err["type"] == "server_error"
    # The client hung up: its slot (and its KV blocks) are freed and new requests are admitted.
    deadline = time.monotonic() + 10
    while (r := httpx.post(url, json=CHAT, headers=headers)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def test_echo_of_out_of_range_token_ids_is_a_400(client: OpenAI) -> None:
    """Found by the fuzzer: echo decoded the prompt's ids before they were range-checked (500)."""
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=BASE_MODEL, prompt=[[5, -3], [10**30]], echo=True, max_tokens=2,
                                      stream=stream)
        assert err.value.status_code == 400 and "token ids" in str(err.value)
