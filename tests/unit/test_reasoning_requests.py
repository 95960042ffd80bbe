"""Request side of reasoning: chat_template_kwargs and reasoning_effort become template variables,
past reasoning reaches the template, and the Responses API maps its reasoning fields and items."""

from __future__ import annotations

from typing import Any

import pytest

from sloth_serve.api.errors import APIError
from sloth_serve.api.protocol import ChatCompletionRequest
from sloth_serve.api.responses_protocol import ResponsesRequest

ASK: Any = [{"role": "user", "content": "Hi"}]


def test_template_kwargs_take_reasoning_effort_and_refuse_the_servers_own_arguments() -> None:
    body = ChatCompletionRequest.model_validate({"messages": ASK, "reasoning_effort": "low",
                                                 "chat_template_kwargs": {"enable_thinking": False}})
    assert body.template_kwargs() == {"enable_thinking": False, "reasoning_effort": "low"}
    clash = ChatCompletionRequest.model_validate({"messages": ASK, "chat_template_kwargs": {"tools": []}})
    with pytest.raises(APIError) as err:
        clash.template_kwargs()
    assert err.value.param == "chat_template_kwargs"


def test_past_reasoning_is_given_to_the_template() -> None:
    turn = {"role": "assistant", "content": "Hello.", "reasoning": "Greet back."}
    body = ChatCompletionRequest.model_validate({"messages": [*ASK, turn, *ASK]})
    assert body.conversation()[1] == {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."}


def test_responses_reasoning_effort_and_items_map_to_the_chat_request() -> None:
    items: Any = [
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Look it up."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]
    chat = ResponsesRequest.model_validate({"input": items, "reasoning": {"effort": "high", "summary": "auto"}}).to_chat()
    assert chat.reasoning_effort == "high"
    assistant = chat.conversation()[1]
    assert assistant["reasoning_content"] == "Look it up." and assistant["tool_calls"][0]["function"]["name"] == "get_weather"
    with pytest.raises(APIError) as err:
        ResponsesRequest.model_validate({"input": "x", "reasoning": {"effort": "huge"}}).to_chat()
    assert err.value.param == "reasoning.effort"
