"""POST /v1/chat/completions through the official client and raw SSE: responses, streaming framing,
n > 1, logprobs, usage, and the LoRA adapter served as its own model."""

from __future__ import annotations

from live_server import BASE_MODEL, LiveServer
from openai import OpenAI
from sse_client import chunks, stream

QUESTION = [{"role": "user", "content": "What does `json.dumps` do?"}]


def test_chat_completion_returns_answer_and_usage(client: OpenAI) -> None:
    r = client.chat.completions.create(model=BASE_MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == BASE_MODEL
    [choice] = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_ends_with_length(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_stream_matches_non_stream_text(client: OpenAI) -> None:
    whole = client.chat.completions.create(model=BASE_MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    parts, finish = [], []
    for chunk in client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, max_tokens=20, temperature=0, stream=True
    ):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish.append(c.finish_reason)
    assert "".join(parts) == whole.choices[0].message.content
    assert finish[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finish[:-1])


def test_sse_framing_role_first_finish_last_then_done(server: LiveServer) -> None:
    body = {"model": BASE_MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True}
    events = stream(f"{server.base_url}/chat/completions", body)
    parsed = chunks(events)
    assert all(c["object"] == "chat.completion.chunk" for c in parsed)
    assert len({c["id"] for c in parsed}) == 1
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed[:-1])


def test_include_usage_sends_usage_chunk_with_no_choices_last(server: LiveServer) -> None:
    body = {
        "model": BASE_MODEL, "messages": QUESTION, "max_tokens": 6, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip
    parsed = chunks(stream(f"{server.base_url}/chat/completions", body))
    usage_chunk = parsed[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 6
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 6
    assert all(c["usage"] is None for c in parsed[:-1])


def test_n_2_gives_two_indexed_choices(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, max_tokens=10, temperature=1.0, seed=7, n=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == 20
    again = client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, max_tokens=10, temperature=1.0, seed=7, n=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_n_2_streams_both_choices_to_their_finish(client: OpenAI) -> None:
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, max_tokens=8, temperature=0, n=2, stream=True
    ):
        for c in chunk.choices:
            assert c.index not in finished
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    assert texts[0] == texts[1] != ""  # greedy: both choices agree


def test_chat_logprobs_format(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0
        assert t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token


def test_streamed_logprobs_cover_every_token(server: LiveServer) -> None:
    body = {
        "model": BASE_MODEL, "messages": QUESTION, "max_tokens": 6, "temperature": 0, "stream": True,
        "logprobs": True, "ignore_eos": True,
    }  # fmt: skip
    parsed = chunks(stream(f"{server.base_url}/chat/completions", body))
    entries = [e for c in parsed for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert len(entries) == 6
    assert all(e["top_logprobs"] == [] for e in entries)


def test_text_content_parts_equal_plain_string(client: OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What does `json.dumps` do?"}]}]
    a = client.chat.completions.create(model=BASE_MODEL, messages=parts, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    b = client.chat.completions.create(model=BASE_MODEL, messages=QUESTION, max_tokens=10, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_adapter_model_answers_in_upper_case_and_base_does_not(client: OpenAI) -> None:
    questions = ["What does `json.dumps` do?", "What does `os.path.join` do?"]
    for q in questions:
        messages = [{"role": "user", "content": q}]
        upper = client.chat.completions.create(model="upper", messages=messages, max_tokens=30, temperature=0)  # type: ignore[arg-type]
        base = client.chat.completions.create(model=BASE_MODEL, messages=messages, max_tokens=30, temperature=0)  # type: ignore[arg-type]
        upper_text = upper.choices[0].message.content or ""
        base_text = base.choices[0].message.content or ""
        assert upper.model == "upper"
        assert any(ch.isalpha() for ch in upper_text) and upper_text == upper_text.upper()
        assert base_text != base_text.upper()
