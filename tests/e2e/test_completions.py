"""POST /v1/completions: text, token-id and batched prompts, echo, n > 1, logprobs, streaming."""

from __future__ import annotations

import httpx
from live_server import BASE_MODEL, LiveServer
from openai import OpenAI
from sse_client import chunks, stream

PROMPT = "The json module"


def test_completion_returns_text_and_usage(client: OpenAI) -> None:
    r = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.id.startswith("cmpl-")
    assert r.object == "text_completion"
    [choice] = r.choices
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 10


def test_token_id_prompt_equals_text_prompt(server: LiveServer, client: OpenAI) -> None:
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    by_ids = client.completions.create(model=BASE_MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)


def test_batched_prompts_times_n_give_prompt_major_choices(client: OpenAI) -> None:
    prompts = ["The json module", "Return the"]
    r = client.completions.create(model=BASE_MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    single = [
        client.completions.create(model=BASE_MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in prompts
    ]
    assert [c.text for c in r.choices] == [single[0], single[0], single[1], single[1]]


def test_echo_prepends_prompt(client: OpenAI) -> None:
    plain = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    echoed = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_completion_logprobs_format(client: OpenAI) -> None:
    r = client.completions.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    for i in range(1, 5):
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0
        assert len(top) <= 2 and max(top.values()) == logprob and token in top


def test_streamed_completion_equals_whole(server: LiveServer, client: OpenAI) -> None:
    whole = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    body = {
        "model": BASE_MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    parsed = chunks(stream(f"{server.base_url}/completions", body))
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"] == whole.model_dump(exclude_none=True)["usage"]
    pieces = [c["choices"][0] for c in parsed[:-1]]
    assert "".join(p["text"] for p in pieces) == whole.choices[0].text
    assert pieces[-1]["finish_reason"] == whole.choices[0].finish_reason
    assert all(c["object"] == "text_completion" for c in parsed)


def test_logit_bias_forces_a_token(server: LiveServer, client: OpenAI) -> None:
    token = httpx.post(f"{server.url}/tokenize", json={"prompt": " module"}).json()["tokens"][0]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": [token]}).json()["prompt"]
    r = client.completions.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={str(token): 100},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].text == text * 3
