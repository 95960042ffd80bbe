"""Streamed chunks built from the per-response template are byte-for-byte what the pydantic models
serialize, for awkward text (quotes, backslashes, control characters, non-ASCII, emoji) and names."""

from __future__ import annotations

import json

import pytest

from sloth_serve.api.chunks import ChatChunks, CompletionChunks
from sloth_serve.api.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)

TEXTS = ["", "plain", ' "quoted" \\ back', "line\nbreak\ttab\r\x00\x1f\x7f", "é ü 中文 🦥", "\u2028\u2029", "</script>"]
NAMES = [("cmpl-1", "base"), ("chatcmpl-x", 'we"ird\\name é')]


@pytest.mark.parametrize(("rid", "model"), NAMES)
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish", [None, "stop", "length"])
def test_completion_chunk_matches_the_model(rid: str, model: str, text: str, finish: str | None) -> None:
    chunks = CompletionChunks(rid, 1700000000, model)
    choice = CompletionChoice(index=3, text=text, finish_reason=finish)
    want = CompletionResponse(id=rid, created=1700000000, model=model, choices=[choice]).model_dump_json()
    assert chunks.choice(choice) == want
    assert json.loads(chunks.choice(choice))["choices"][0]["text"] == text


@pytest.mark.parametrize(("rid", "model"), NAMES)
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish", [None, "stop", "tool_calls"])
def test_chat_chunk_matches_the_model(rid: str, model: str, text: str, finish: str | None) -> None:
    chunks = ChatChunks(rid, 1700000000, model)
    for delta in ({"content": text}, {"role": "assistant", "content": ""}, {},
                  {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "f", "arguments": text}}]}):
        choice = ChatChunkChoice(index=1, delta=delta, finish_reason=finish)
        want = ChatCompletionChunk(id=rid, created=1700000000, model=model, choices=[choice]).model_dump_json()
        assert chunks.choice(1, delta, finish) == want


def test_logprob_and_usage_chunks_go_through_the_models() -> None:
    chat = ChatChunks("c", 5, "m")
    lp = ChatLogprobs(content=[ChatTokenLogprob(token="a", logprob=-0.25, bytes=[97])])
    want = ChatCompletionChunk(id="c", created=5, model="m",
                               choices=[ChatChunkChoice(index=0, delta={"content": "a"}, logprobs=lp)]).model_dump_json()
    assert chat.choice(0, {"content": "a"}, None, lp) == want
    usage = Usage.of(3, 4)
    assert chat.usage(usage) == ChatCompletionChunk(id="c", created=5, model="m", choices=[], usage=usage).model_dump_json()
    comp = CompletionChunks("c", 5, "m")
    choice = CompletionChoice(index=0, text="a", logprobs=CompletionLogprobs(tokens=["a"], token_logprobs=[-0.5],
                                                                         top_logprobs=[None], text_offset=[0]))
    assert comp.choice(choice) == CompletionResponse(id="c", created=5, model="m", choices=[choice]).model_dump_json()
