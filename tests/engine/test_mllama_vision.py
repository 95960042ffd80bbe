"""Llama 3.2 Vision through the offline LLM: a tiny random MllamaForConditionalGeneration gives
transformers' prompt ids and greedy tokens for prompts with images (one image, two images apart and
side by side, text before the first image, a text-only request in the same batch, prefill chunked
over several steps); different images give different outputs; a repeated image comes from the
encoder and prefix caches, another image never from the latter."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from mllama_models import IMAGE_TOKEN, MAX_TOKENS, chat_text, hf_greedy, make_mllama
from peft import LoraConfig, PeftModel, get_peft_model
from vision_models import random_image

from sloth_serve.engine.cross_inputs import image_ranges
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.llm import LLM
from sloth_serve.loader.adapter_config import AdapterError

LANGUAGE_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[LLM, Any]:
    folder, hf = make_mllama(tmp_path_factory.mktemp("mllama") / "model")
    # 8 tokens a step: prompts are prefilled over several steps, images' rows split between them
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=8, max_loras=2, max_lora_rank=8)
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


def write_adapter(hf: Any, folder: Path, target: str) -> Path:
    """PEFT's adapter on the modules matching `target`, random lora_B; the base left as it was."""
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=8, lora_alpha=16, target_modules=target))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(folder))
    return folder


def test_language_lora_per_request_equals_peft(served: tuple[LLM, Any], tmp_path: Path) -> None:
    """LoRA on every language projection, the cross-attention layers' k/v (which run over image
    states) included, beside a base request with the same image: each gives its own model's tokens."""
    llm, hf = served
    adapter = write_adapter(hf, tmp_path / "tuned", LANGUAGE_LAYERS)
    llm.adapters.register("tuned", str(adapter))
    images = [random_image(6, 20, 30)]
    text = chat_text(llm.tokenizer, ["Look:", IMAGE_TOKEN, "what is it?"])
    prompt: Any = {"prompt": text, "images": images}
    tuned, plain, tuned_text = llm.generate([prompt, prompt, chat_text(llm.tokenizer, ["Only text."])], GREEDY,
                                            adapter=["tuned", None, "tuned"])
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    assert tuned.token_ids == hf_greedy(peft, llm.tokenizer, text, images)[1]
    assert plain.token_ids == hf_greedy(hf, llm.tokenizer, text, images)[1] != tuned.token_ids
    assert tuned_text.token_ids == hf_greedy(peft, llm.tokenizer, chat_text(llm.tokenizer, ["Only text."]), [])[1]
    vision = write_adapter(hf, tmp_path / "vision", r".*vision_model\.transformer.*\.(q_proj|v_proj)")
    with pytest.raises(AdapterError, match="vision encoder"):
        llm.adapters.register("vision", str(vision))
