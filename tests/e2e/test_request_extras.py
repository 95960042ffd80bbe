"""Request fields as OpenAI's SDKs and vLLM's users send them: `null` for a nullable field means its
default; /v1/completions generates 16 tokens when max_tokens is left out and takes response_format /
structured_outputs; a stop token's text is not the client's (unless include_stop_str_in_output),
min_tokens holds back stop strings as it holds back EOS; chat continues a final assistant message;
vLLM's extras this server does not implement are a 400 naming them."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from live_server import BASE_MODEL, LiveServer
from openai import OpenAI
from sse_client import chunks, stream

PROMPT = "Return the"


def greedy(client: OpenAI, n: int = 24) -> tuple[list[str], str]:
    """The greedy tokens (texts) and text of PROMPT, with no stop."""
    r = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    tokens = r.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert tokens is not None
    return tokens, r.choices[0].text


def post(server: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": BASE_MODEL, **body}, headers=server.headers(),
                      timeout=60)


def streamed_text(server: LiveServer, body: dict[str, Any]) -> tuple[str, str | None]:
    parsed = chunks(stream(f"{server.base_url}/completions", {"model": BASE_MODEL, **body, "stream": True}))
    return "".join(c["choices"][0]["text"] for c in parsed if c["choices"]), parsed[-1]["choices"][0]["finish_reason"]


def test_null_for_a_field_with_a_default_means_the_default(server: LiveServer, client: OpenAI) -> None:
    # The SDK sends null for a caller's None.
    r = client.chat.completions.create(model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       n=None, logprobs=None, stream=None)
    assert len(r.choices) == 1 and r.choices[0].logprobs is None
    c = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=3, n=None, echo=None)
    assert len(c.choices) == 1 and not c.choices[0].text.startswith(PROMPT)
    response = post(server, "/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": None,
                                             "min_tokens": None, "ignore_eos": None, "stream_options": None})
    assert response.status_code == 200, response.text
    # A nullable field's null stays null: max_tokens null is all the room the context leaves (20 here).
    max_model_len = client.models.retrieve(BASE_MODEL).model_extra["max_model_len"]  # type: ignore[index]
    prompt = tokenize(server, "Return the value of the key. " * (max_model_len // 4))[:max_model_len - 20]
    response = post(server, "/completions", {"prompt": prompt, "max_tokens": None, "ignore_eos": True})
    assert response.json()["usage"]["completion_tokens"] == 20


def test_completions_default_to_16_tokens(client: OpenAI) -> None:
    r = client.completions.create(model=BASE_MODEL, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_completions_take_structured_outputs_and_response_format(server: LiveServer) -> None:
    r = post(server, "/completions", {"prompt": "hi", "max_tokens": 10, "structured_outputs": {"regex": "[0-9]{4}"}})
    assert r.status_code == 200, r.text
    assert re.fullmatch("[0-9]{4}", r.json()["choices"][0]["text"])
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"]}
    r = post(server, "/completions", {"prompt": "hi", "max_tokens": 60, "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and json.loads(choice["text"])["n"] in (1, 2, 3), choice
    # Checked as on chat: a bad pattern names its field.
    r = post(server, "/completions", {"prompt": "hi", "structured_outputs": {"regex": "(", "grammar": None}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.regex"


def tokenize(server: LiveServer, text: str) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"model": BASE_MODEL, "prompt": text, "add_special_tokens": False},
                   headers=server.headers())
    return r.json()["tokens"]  # type: ignore[no-any-return]


def test_a_stop_token_ids_text_is_not_the_clients(server: LiveServer, client: OpenAI) -> None:
    tokens, text = greedy(client)
    prompt_ids = tokenize(server, PROMPT)
    ids = tokenize(server, PROMPT + text)[len(prompt_ids):]
    # The first token of the output not seen before it (its first occurrence ends the output).
    k = next(i for i in range(1, len(tokens)) if tokens[i].strip() and ids[i] not in ids[:i])
    assert ids[:len(prompt_ids)] != [] and len(ids) >= k + 1
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop_token_ids": [ids[k]], "ignore_eos": True}
    r = post(server, "/completions", body).json()
    expected = "".join(tokens[:k])
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (expected, "stop")
    assert r["usage"]["completion_tokens"] == k + 1  # the stop token counts as output
    assert streamed_text(server, body) == (expected, "stop")
    kept = post(server, "/completions", {**body, "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"] == expected + tokens[k]
    assert streamed_text(server, {**body, "include_stop_str_in_output": True}) == (expected + tokens[k], "stop")


def test_include_stop_str_in_output_keeps_the_stop_string(server: LiveServer, client: OpenAI) -> None:
    tokens, _ = greedy(client)
    k = next(i for i in range(1, len(tokens)) if tokens[i].strip() and tokens[i] not in "".join(tokens[:i]))
    stop = tokens[k]
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop], "ignore_eos": True,
            "include_stop_str_in_output": True}
    expected = "".join(tokens[:k + 1])
    assert post(server, "/completions", body).json()["choices"][0]["text"] == expected
    assert streamed_text(server, body) == (expected, "stop")


def visible(tokens: list[str]) -> str:
    """The text of these tokens as the client gets it (special tokens skipped)."""
    return "".join(t for t in tokens if not (t.startswith("<|") and t.endswith("|>")))


def test_min_tokens_hold_back_stop_strings(server: LiveServer, client: OpenAI) -> None:
    tokens, text = greedy(client)
    stop = tokens[1]  # matched at once without min_tokens
    assert stop.strip() and stop not in tokens[0]
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop], "ignore_eos": True}
    assert post(server, "/completions", body).json()["choices"][0]["text"] == tokens[0]
    held = post(server, "/completions", {**body, "min_tokens": 8}).json()
    out, reason = held["choices"][0]["text"], held["choices"][0]["finish_reason"]
    # The first 8 tokens' text is out whole; a stop string can end only in a later token.
    first = visible(tokens[:8])
    assert stop in first and out.startswith(first)
    later = text[len(first):]
    assert (out, reason) == ((first + later[:later.index(stop)], "stop") if stop in later else (text, "length"))
    assert streamed_text(server, {**body, "min_tokens": 8}) == (out, reason)


def test_chat_continues_the_final_assistant_message(server: LiveServer, client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    r = post(server, "/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0,
                                          "add_generation_prompt": False, "continue_final_message": True})
    assert r.status_code == 200, r.text
    prompt = httpx.post(f"{server.url}/tokenize", json={"model": BASE_MODEL, "messages": messages,
                                                       "add_generation_prompt": False},
                        headers=server.headers()).json()
    # The prompt ends with the assistant's words (no end-of-turn after them): it is their continuation
    # that comes back, as a completion of the rendered text would give.
    rendered = httpx.post(f"{server.url}/detokenize", json={"model": BASE_MODEL, "tokens": prompt["tokens"]},
                          headers=server.headers()).json()["prompt"]
    open_text = rendered[:rendered.rindex("The colour is") + len("The colour is")]
    c = client.completions.create(model=BASE_MODEL, prompt=tokenize(server, open_text), max_tokens=6, temperature=0)
    assert r.json()["choices"][0]["message"]["content"] == c.choices[0].text
    r = post(server, "/chat/completions", {"messages": messages, "max_tokens": 2, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


@pytest.mark.parametrize("field, value", [("allowed_token_ids", [1, 2]), ("bad_words", ["x"]),
                                          ("use_beam_search", True)])
def test_vllm_extras_not_implemented_are_a_400(server: LiveServer, field: str, value: Any) -> None:
    for path, body in (("/completions", {"prompt": PROMPT}), ("/chat/completions", {"messages": [
            {"role": "user", "content": "hi"}]})):
        r = post(server, path, {**body, "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = post(server, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                          "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_tokenize_counts_the_prompt_the_chat_endpoint_sends(server: LiveServer) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    for extra in ({}, {"tools": [tool]}, {"tools": [tool], "chat_template_kwargs": {"enable_thinking": False}}):
        chat = post(server, "/chat/completions", {"messages": messages, "max_tokens": 1, **extra}).json()
        counted = httpx.post(f"{server.url}/tokenize", json={"model": BASE_MODEL, "messages": messages,
                                                            "return_token_strs": True, **extra},
                             headers=server.headers()).json()
        assert counted["count"] == chat["usage"]["prompt_tokens"], extra
        assert len(counted["token_strs"]) == counted["count"]
    r = httpx.post(f"{server.url}/tokenize", json={"model": BASE_MODEL, "messages": []}, headers=server.headers())
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server: LiveServer) -> None:
    ids = tokenize(server, "The json module encodes objects. " + PROMPT)
    k = len(tokenize(server, PROMPT)) + 1
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    cut = post(server, "/completions", {**body, "prompt": ids[-k:]}).json()
    for prompt in (ids, "The json module encodes objects. " + PROMPT):
        r = post(server, "/completions", {**body, "prompt": prompt, "truncate_prompt_tokens": k, "echo": True}).json()
        assert r["usage"]["prompt_tokens"] == k and r["choices"][0]["text"].endswith(cut["choices"][0]["text"])
    chat = post(server, "/chat/completions", {**body, "messages": [{"role": "user", "content": "hi " * 50}],
                                             "truncate_prompt_tokens": 8}).json()
    assert chat["usage"]["prompt_tokens"] == 8
    r = post(server, "/completions", {**body, "prompt": PROMPT, "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"
    # A text far longer than the context is cut, not refused by the character bound.
    long_text = "The json module encodes objects. " * 4000 + PROMPT
    r = post(server, "/completions", {**body, "prompt": long_text, "truncate_prompt_tokens": k})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == cut["choices"][0]["text"], r.text
    r = post(server, "/completions", {**body, "prompt": long_text})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_a_prompt_of_max_model_len_tokens_is_scored(server: LiveServer, client: OpenAI) -> None:
    """lm-eval's loglikelihood of a context that fills the window: max_tokens 0 needs no new position."""
    max_model_len = client.models.retrieve(BASE_MODEL).model_extra["max_model_len"]  # type: ignore[index]
    prompt = tokenize(server, "Return the value of the key. " * (max_model_len // 4))[:max_model_len]
    r = post(server, "/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == max_model_len and logprobs["token_logprobs"][0] is None
    # One more token asked for is over the context: a 400, as before.
    r = post(server, "/completions", {"prompt": prompt, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_continuous_usage_stats_is_a_400(server: LiveServer) -> None:
    r = post(server, "/completions", {"prompt": PROMPT, "max_tokens": 2, "stream": True,
                                      "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.continuous_usage_stats"
