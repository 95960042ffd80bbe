"""Prompt logprobs through the openai client: the request lm-evaluation-harness's loglikelihood tasks
send (echo + logprobs + max_tokens 1, and max_tokens 0), vLLM's `prompt_logprobs` on chat and
completions, streamed echo. The server runs the demo model in 4-bit, so the reference is the server's
own next-token distribution after each prefix (sampled-token logprobs, a separate code path);
tests/engine/test_prompt_logprobs_engine.py checks the values against transformers exactly."""

from __future__ import annotations

import httpx
import pytest
from live_server import BASE_MODEL, LiveServer
from openai import OpenAI
from sse_client import chunks, stream
from transformers import AutoTokenizer

from sloth_serve.loader import DEMO_MODEL

TEXT = "Return the path of the configuration file, or raise an error"
TOL = 1e-3  # the same 4-bit weights through prefills of other lengths


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL)).encode(TEXT)


@pytest.fixture(scope="module")
def ref(client: OpenAI, ids: list[int]) -> list[dict[str, float]]:
    """Entry j (1 <= j <= len(ids)): the top-20 {token text: logprob} of the token after ids[:j], from a
    plain one-token completion of that prefix."""
    out: list[dict[str, float]] = [{}]
    for j in range(1, len(ids) + 1):
        r = client.completions.create(model=BASE_MODEL, prompt=[ids[:j]], max_tokens=1, logprobs=20, temperature=0)
        lp = r.choices[0].logprobs
        assert lp is not None and lp.top_logprobs is not None and lp.top_logprobs[0] is not None
        out.append(lp.top_logprobs[0])
    return out


def check_position(logprob: float, token: str, ref: dict[str, float]) -> bool:
    """Whether the token is in the reference's top 20 (then its logprob must be the reference's)."""
    if token in ref:
        assert logprob == pytest.approx(ref[token], abs=TOL)
        return True
    assert logprob <= min(ref.values()) + TOL
    return False


def test_lm_eval_loglikelihood_request_scores_every_prompt_token(client: OpenAI, ids: list[int],
                                                                 ref: list[dict[str, float]]) -> None:
    r = client.completions.create(model=BASE_MODEL, prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0)
    [choice] = r.choices
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    n = len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    found = 0
    for j in range(1, n):
        logprob, top = lp.token_logprobs[j], lp.top_logprobs[j]
        assert logprob is not None and top is not None and top[lp.tokens[j]] == logprob
        found += check_position(logprob, lp.tokens[j], ref[j])
        # lm-eval's is_greedy: the dict's best entry is the model's most likely token there.
        assert max(top.values()) == pytest.approx(max(ref[j].values()), abs=TOL)
        assert len(top) <= 2  # logprobs=1: the top token, and the prompt's own when it is not that
    assert found >= n // 2  # most of the prompt was compared, not only bounded
    # Then the generated token, as without echo.
    plain = client.completions.create(model=BASE_MODEL, prompt=[ids], max_tokens=1, logprobs=1, temperature=0)
    plain_lp = plain.choices[0].logprobs
    assert plain_lp is not None and plain_lp.token_logprobs is not None
    assert lp.tokens[n] == plain_lp.tokens[0]  # type: ignore[index]
    assert lp.token_logprobs[n] == pytest.approx(plain_lp.token_logprobs[0], abs=TOL)
    assert lp.text_offset[n] == len(choice.text) - len(plain.choices[0].text)
    assert choice.text.endswith(plain.choices[0].text) and len(choice.text) > len(plain.choices[0].text)
    assert r.usage is not None and r.usage.prompt_tokens == n and r.usage.completion_tokens == 1


def test_max_tokens_zero_with_echo_returns_only_the_scored_prompt(client: OpenAI, ids: list[int],
                                                                  ref: list[dict[str, float]]) -> None:
    r = client.completions.create(model=BASE_MODEL, prompt=[ids], max_tokens=0, logprobs=0, echo=True, temperature=0)
    [choice] = r.choices
    assert choice.finish_reason == "length"
    assert choice.text == AutoTokenizer.from_pretrained(str(DEMO_MODEL)).decode(ids)
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and len(lp.token_logprobs) == len(ids)
    assert lp.tokens is not None and lp.token_logprobs[0] is None
    for j in range(1, len(ids)):
        check_position(lp.token_logprobs[j], lp.tokens[j], ref[j])  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.completion_tokens == 0
    # Without logprobs it is the echo alone.
    bare = client.completions.create(model=BASE_MODEL, prompt=[ids], max_tokens=0, echo=True)
    assert bare.choices[0].text == choice.text and bare.choices[0].logprobs is None


def test_prompt_logprobs_field_on_completions_is_vllms_shape(client: OpenAI, ids: list[int],
                                                             ref: list[dict[str, float]]) -> None:
    r = client.completions.create(model=BASE_MODEL, prompt=[ids], max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    entries = r.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        entry, want = entries[j], sorted(ref[j].values(), reverse=True)
        mine = entry[str(ids[j])]
        check_position(mine["logprob"], mine["decoded_token"], ref[j])
        # Its rank: 1 + the reference tokens more likely than it (where the reference reaches it).
        if mine["rank"] <= 10:
            assert mine["rank"] == 1 + sum(v > mine["logprob"] + TOL for v in want)
        ranked = sorted((v for v in entry.values() if v["rank"] <= 2), key=lambda v: v["rank"])
        assert [v["rank"] for v in ranked] == [1, 2]
        assert [v["logprob"] for v in ranked] == pytest.approx(want[:2], abs=TOL)
        assert len(entry) <= 3 and all(isinstance(v["decoded_token"], str) for v in entry.values())
    assert r.choices[0].logprobs is None  # the legacy field only with `logprobs`


def test_chat_prompt_logprobs_cover_the_templated_prompt(client: OpenAI, server: LiveServer) -> None:
    messages = [{"role": "user", "content": "What does `json.dumps` do?"}]
    r = client.chat.completions.create(model=BASE_MODEL, messages=messages, max_tokens=3,  # type: ignore[arg-type]
                                       temperature=0, extra_body={"prompt_logprobs": 2})
    entries = r.model_extra["prompt_logprobs"]  # type: ignore[index]
    assert r.usage is not None and len(entries) == r.usage.prompt_tokens and entries[0] is None
    assert all(1 <= len(e) <= 3 and all(v["logprob"] <= 0 for v in e.values()) for e in entries[1:])
    plain = client.chat.completions.create(model=BASE_MODEL, messages=messages, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    assert "prompt_logprobs" not in (plain.model_extra or {})
    # Streamed: one chunk per choice carries the same entries.
    body = {"model": BASE_MODEL, "messages": messages, "max_tokens": 3, "temperature": 0, "stream": True,
            "prompt_logprobs": 2}
    streamed = [c["prompt_logprobs"] for c in chunks(stream(f"{server.base_url}/chat/completions", body)) if "prompt_logprobs" in c]
    assert streamed == [entries]


def test_streamed_echo_with_logprobs_equals_the_whole_response(client: OpenAI, server: LiveServer, ids: list[int]) -> None:
    whole = client.completions.create(model=BASE_MODEL, prompt=[ids], max_tokens=3, logprobs=1, echo=True, temperature=0)
    body = {"model": BASE_MODEL, "prompt": [ids], "max_tokens": 3, "logprobs": 1, "echo": True, "temperature": 0,
            "stream": True}
    got = [c["choices"][0] for c in chunks(stream(f"{server.base_url}/completions", body)) if c["choices"]]
    assert "".join(c["text"] for c in got) == whole.choices[0].text
    tokens = [t for c in got if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
    assert whole.choices[0].logprobs is not None
    assert tokens == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    assert got[0]["logprobs"]["token_logprobs"][0] is None


@pytest.mark.parametrize(
    ("change", "param"),
    [({"max_tokens": 0}, "max_tokens"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
     ({"prompt_logprobs": -1}, "prompt_logprobs")],
)
def test_invalid_prompt_scoring_requests_are_400s(server: LiveServer, change: dict, param: str) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": BASE_MODEL, "prompt": "x", **change}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
