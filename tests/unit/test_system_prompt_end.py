"""Where a chat prompt's system part ends, as the chat endpoint tells an engine that snapshots recurrent
state (server/api/serving_chat.py `system_prompt_end`): the prompt's common prefix with its leading
system messages rendered alone, or with an empty user turn after them for a template that wants one;
0 where there is nothing to snapshot or the engine keeps no snapshots."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer

from sloth_serve.api.protocol import ChatCompletionRequest
from sloth_serve.api.serving_chat import system_prompt_end
from sloth_serve.loader import DEMO_MODEL

ROLES = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Like Qwen's templates: a conversation without a user turn is an error.
WANTS_USER = ("{%- if messages | selectattr('role', 'equalto', 'user') | list | length == 0 %}"
              "{{- raise_exception('No user query found in messages.') }}{%- endif %}" + ROLES)
SYSTEM = "You are a careful assistant. Answer in one sentence."


def end_of(template: str, messages: list[dict[str, str]], snapshots: bool = True) -> tuple[int, list[int], Any]:
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    tok.chat_template = template
    body = ChatCompletionRequest(model="m", messages=messages)  # type: ignore[arg-type]
    prompt = tok.apply_chat_template(body.conversation(), add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    runtime = SimpleNamespace(info=SimpleNamespace(state_snapshots=snapshots))
    end = asyncio.run(system_prompt_end(runtime, SimpleNamespace(tokenizer=tok), body, None,  # type: ignore[arg-type]
                                        list(prompt)))
    return end, list(prompt), tok


@pytest.mark.parametrize("template", [ROLES, WANTS_USER], ids=["system-alone", "needs-a-user-turn"])
def test_the_end_covers_the_system_turn_and_stops_before_the_user_text(template: str) -> None:
    end, prompt, tok = end_of(template, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
    head, rest = tok.decode(prompt[:end]), tok.decode(prompt[end:])
    assert head.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and "Hi" in rest and "Hi" not in head


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],  # no system prompt
    [{"role": "system", "content": SYSTEM}],  # nothing after it: the prompt's own end is the point
])
def test_nothing_to_snapshot_gives_zero(messages: list[dict[str, str]]) -> None:
    assert end_of(ROLES, messages)[0] == 0


def test_an_engine_without_snapshots_gets_zero() -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    assert end_of(ROLES, messages, snapshots=False)[0] == 0
