"""Gemma 3n served over HTTP from a Gemma3nForConditionalGeneration checkpoint (tests/engine/
test_gemma3n_family.py's tiny text model with image and audio tower tensors beside it, and a PEFT
adapter as `--lora tuned=...`): the official `openai` client gets transformers' greedy tokens for the
base and PEFT's for the adapter at once; images and audio in a chat are a 400 naming the part."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import family_serving
import openai
import pytest
from family_serving import MESSAGES, Servers, check_base_and_adapter, reference, write_random_adapter
from live_server import LiveServer

MAX_TOKENS = 8
MODEL = "gemma3n-mm"  # the served folder's name
family = family_serving.tests_module("test_gemma3n_family", "engine")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, Path]]:
    tmp = tmp_path_factory.mktemp("gemma3n-serving")
    text_folder, _ = family.make_gemma3n(tmp)
    folder = family.make_multimodal(text_folder, tmp / "gemma3n-mm")
    adapter = write_random_adapter(text_folder, tmp / "adapter", ["q_proj", "v_proj", "o_proj", "down_proj"])
    with Servers(tmp) as servers:
        server = servers.launch(MODEL, folder, "--max-num-batched-tokens", "16", "--device", "cpu",
                                "--dtype", "float32", loras={"tuned": adapter})
        servers.ready(lambda: [reference(text_folder, lora, p, MAX_TOKENS) for lora in (None, adapter)
                               for p in family.prompts()[1:3]])
        yield server, text_folder, adapter


def test_completions_equal_transformers_and_peft(served: tuple[LiveServer, Path, Path]) -> None:
    server, text_folder, adapter = served  # the reference reads the same text model from its own checkpoint
    check_base_and_adapter(server, text_folder, MODEL, adapter, family.prompts()[1:3], MAX_TOKENS, at_once=True)


@pytest.mark.parametrize("part, param, says", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
     "messages[0].content[0].image_url", "text only"),
    ({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
     "messages[0].content[0].type", "input_audio"),
])
def test_images_and_audio_are_refused_naming_the_part(served: tuple[LiveServer, Path, Path], part: dict,
                                                      param: str, says: str) -> None:
    client = served[0].client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}])
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == param and says in error["message"], error
    reply = client.chat.completions.create(model=MODEL, max_tokens=4, messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"  # the server serves on
