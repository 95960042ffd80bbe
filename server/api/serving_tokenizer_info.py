"""`GET /tokenizer_info` in vLLM's shape: the tokenizer's configuration as tokenizer_config.json has
it (special tokens as their text), its class and the chat template a request would be rendered with.
Tools such as lm-evaluation-harness read it to tokenize on the client side."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .serving_adapters import resolve_adapter
from .state import StateDep

router = APIRouter()

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


@router.get("/tokenizer_info")
async def tokenizer_info(state: StateDep, model: str | None = None) -> dict[str, Any]:
    """`model` (a query parameter, an extension of vLLM's endpoint) picks an adapter's own
    tokenizer and template; by default the base model's."""
    runtime = state.ready()
    adapter_id = await resolve_adapter(state, runtime, model)
    return describe(runtime.tokenizers.of(adapter_id).tokenizer)


def describe(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's init kwargs (private and file-path ones left out: the client cannot read
    this machine's files), JSON-ready, with `tokenizer_class` and `chat_template`."""
    config = {k: _jsonable(v) for k, v in getattr(tokenizer, "init_kwargs", {}).items()
              if not k.startswith("_") and not k.endswith("_file") and k != "name_or_path"}
    # Always present (None when unset), as the tokenizer has them now: lm-evaluation-harness takes a
    # server without `eos_token` in this object for one that cannot tokenize remotely.
    for name in SPECIAL_TOKENS:
        config[name] = _jsonable(getattr(tokenizer, name, None))
    config["tokenizer_class"] = type(tokenizer).__name__
    template = getattr(tokenizer, "chat_template", None)
    if template:
        config["chat_template"] = template
    return config


def _jsonable(value: Any) -> Any:
    """AddedToken (and anything like it) as its text; containers element by element."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    content = getattr(value, "content", None)
    return content if isinstance(content, str) else str(value)
