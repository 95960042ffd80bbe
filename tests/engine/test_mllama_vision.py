"""Llama 3.2 Vision through the offline LLM: a tiny random MllamaForConditionalGeneration gives
transformers' prompt ids and greedy tokens for prompts with images (one image, two images apart and
side by side, text before the first image, a text-only request in the same batch, prefill chunked
over several steps); different images give different outputs; a repeated image comes from the
encoder and prefix caches, another image never from the latter."""

from __future__ import annotations

from typing import Any

import pytest
from mllama_models import IMAGE_TOKEN, MAX_TOKENS, chat_text, hf_greedy, make_mllama
from vision_models import random_image

from server.engine.cross_inputs import image_ranges
from server.engine.sampling_params import SamplingParams
from server.llm import LLM

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[LLM, Any]:
    folder, hf = make_mllama(tmp_path_factory.mktemp("mllama") / "model")
    # 8 tokens a step: prompts are prefilled over several steps, images' rows split between them
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=8)
    return llm, hf


def test_image_ranges_follow_transformers_mask() -> None:
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    for offsets, length in (([3], 10), ([2, 6], 12), ([2, 3, 7], 12), ([1, 2, 3], 9), ([0, 4, 5], 9)):
        ids = [9 if i in offsets else 0 for i in range(length)]
        want = get_cross_attention_token_mask(ids, 9)
        got = image_ranges(offsets, length)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [min(e, length) for _, e in got] == [length if e == -1 else e for _, e in want]


def test_images_give_transformers_greedy_tokens(served: tuple[LLM, Any]) -> None:
    llm, hf = served
    tok = llm.tokenizer
    cases: list[tuple[list[str], list[Any]]] = [
        ([IMAGE_TOKEN, "What is this?"], [random_image(1, 30, 20)]),  # 2 tiles side by side
        (["Compare", IMAGE_TOKEN, "with", IMAGE_TOKEN, "please."], [random_image(2, 12, 30), random_image(3, 16, 16)]),
        (["Two at once:", IMAGE_TOKEN, IMAGE_TOKEN, "which?"], [random_image(4), random_image(5, 40, 10)]),
        (["No picture here, only text."], []),
    ]
    prompts: list[Any] = [{"prompt": chat_text(tok, parts), "images": images} if images else chat_text(tok, parts)
                          for parts, images in cases]
    outs = llm.generate(prompts, GREEDY)
    for (parts, images), out in zip(cases, outs, strict=True):
        ids, tokens = hf_greedy(hf, tok, chat_text(tok, parts), images)
        assert out.prompt_token_ids == ids
        assert out.token_ids == tokens, parts


def test_image_content_decides_output_and_caches(served: tuple[LLM, Any]) -> None:
    llm, hf = served
    vision = llm.engine.runner.vision
    assert vision is not None
    text = chat_text(llm.tokenizer, ["Describe the colours in", IMAGE_TOKEN, "in some detail, please."])
    first = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    encoded = vision.num_encoded
    other = llm.generate({"prompt": text, "images": [random_image(11)]}, GREEDY)[0]
    assert other.prompt_token_ids == first.prompt_token_ids
    assert other.token_ids != first.token_ids
    # text before the image attends to it too (transformers): no block of another image's prompt is reused
    assert other.num_cached_tokens == 0
    assert vision.num_encoded == encoded + 1
    again = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    assert again.token_ids == first.token_ids == hf_greedy(hf, llm.tokenizer, text, [random_image(10)])[1]
    assert again.num_cached_tokens > 0
    assert vision.num_encoded == encoded + 1
