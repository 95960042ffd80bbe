"""Image-text models through the offline LLM: a tiny random Qwen2.5-VL gives transformers' greedy
tokens for prompts with images (two images of different sizes in one prompt, prefill chunked across
an image, text-only requests in the same batch); different images give different outputs; a repeated
image is served from the encoder cache and the prefix cache, a different image never from the latter.
LoRA on the vision encoder per request: tests/engine/test_vision_lora.py."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from peft import PeftModel
from vision_models import MAX_TOKENS, hf_greedy, make_qwen2_5_vl, random_image, write_adapter

from sloth_serve.api.tokenizers import base_entry
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.llm import LLM
from sloth_serve.vision_processor import ImageError

LANGUAGE_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[LLM, Any]:
    folder, hf = make_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "model")
    # 16 tokens a step: a prompt's image placeholders are split across prefill chunks
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=16, max_loras=2, max_lora_rank=8)
    return llm, hf


def chat(llm: LLM, num_images: int, question: str) -> str:
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return str(llm.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True))


def test_images_give_transformers_greedy_tokens(served: tuple[LLM, Any]) -> None:
    llm, hf = served
    two = [random_image(1, 30, 20), random_image(2, 17, 33)]
    one = [random_image(3, 32, 32)]
    prompts: list[Any] = [
        {"prompt": chat(llm, 2, "Compare the two pictures."), "images": two},
        chat(llm, 0, "No picture here."),
        {"prompt": chat(llm, 1, "What is this?"), "images": one},
    ]
    outs = llm.generate(prompts, GREEDY)
    ids_two, mm = llm.encode_prompt(prompts[0])
    assert mm is not None and [img.num_tokens for img in mm.images] == [8, 8]
    assert outs[0].prompt_token_ids == ids_two
    assert outs[0].token_ids == hf_greedy(hf, ids_two, two)
    assert outs[1].token_ids == hf_greedy(hf, llm.encode(prompts[1]), [])
    assert outs[2].token_ids == hf_greedy(hf, outs[2].prompt_token_ids, one)


def test_image_content_decides_output_and_caches(served: tuple[LLM, Any]) -> None:
    llm, _ = served
    vision = llm.engine.runner.vision
    assert vision is not None
    text = chat(llm, 1, "Describe the colours in this image, please, in some detail.")
    first = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    encoded = vision.num_encoded
    other = llm.generate({"prompt": text, "images": [random_image(11)]}, GREEDY)[0]
    # Same token ids, another image: a different answer, and nothing of the image's blocks reused.
    assert other.prompt_token_ids == first.prompt_token_ids
    assert other.token_ids != first.token_ids
    offset = llm.encode_prompt({"prompt": text, "images": [random_image(11)]})[1].images[0].offset  # type: ignore[union-attr]
    assert other.num_cached_tokens <= offset
    assert vision.num_encoded == encoded + 1
    again = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens > offset  # the image's blocks came from the prefix cache
    assert vision.num_encoded == encoded + 1


def test_bad_image_prompts_are_refused(served: tuple[LLM, Any]) -> None:
    llm, _ = served
    text = chat(llm, 1, "What is it?")
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": text, "images": [random_image(1), random_image(2)]}, GREEDY)
    with pytest.raises(ImageError, match="could not be decoded"):
        llm.generate({"prompt": text, "images": [b"not an image"]}, GREEDY)
    with pytest.raises(ImageError, match="pixels"):
        llm.generate({"prompt": text, "images": [random_image(1, 5000, 4000)]}, GREEDY)


def test_text_model_refuses_images(tmp_path: Path) -> None:
    from sloth_serve.loader import DEMO_MODEL

    llm = LLM(DEMO_MODEL, load_format="safetensors", dtype="float32", num_kv_blocks=16)
    with pytest.raises(ValueError, match="text only"):
        llm.generate({"prompt": "hi", "images": [random_image(1)]}, GREEDY)


def test_language_lora_per_request_equals_peft(served: tuple[LLM, Any], tmp_path: Path) -> None:
    llm, hf = served
    base = copy.deepcopy(hf)
    adapter = write_adapter(base, tmp_path / "tuned", LANGUAGE_LAYERS)
    llm.adapters.register("tuned", str(adapter))
    images = [random_image(5)]
    prompt: Any = {"prompt": chat(llm, 1, "What is it?"), "images": images}
    tuned, plain = llm.generate([prompt, prompt], GREEDY, adapter=["tuned", None])
    assert tuned.token_ids == hf_greedy(PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval(),
                                        tuned.prompt_token_ids, images)
    assert plain.token_ids == hf_greedy(hf, plain.prompt_token_ids, images) != tuned.token_ids


def test_qwen2_vl_gives_transformers_greedy_tokens(tmp_path: Path) -> None:
    folder, hf = make_qwen2_5_vl(tmp_path / "qwen2-vl", qwen2=True)
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=16)
    images = [random_image(8, 24, 40), random_image(9)]
    out = llm.generate({"prompt": chat(llm, 2, "Which is brighter?"), "images": images}, GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, images)


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3-vl", "qwen3-vl-moe"])
def test_qwen3_vl_gives_transformers_greedy_tokens(tmp_path: Path, moe: bool) -> None:
    """Qwen3-VL and Qwen3-VL-MoE: DeepStack features ride with the image embeddings, also across
    prefill chunks (16 tokens a step) and from the encoder cache; a text-only request in the same
    batch has none."""
    folder, hf = make_qwen2_5_vl(tmp_path / "qwen3-vl", qwen3=True, moe=moe)
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=16)
    images = [random_image(8, 24, 40), random_image(9)]
    prompts: list[Any] = [{"prompt": chat(llm, 2, "Which is brighter?"), "images": images},
                          chat(llm, 0, "No picture here.")]
    outs = llm.generate(prompts, GREEDY)
    assert outs[0].token_ids == hf_greedy(hf, outs[0].prompt_token_ids, images)
    assert outs[1].token_ids == hf_greedy(hf, outs[1].prompt_token_ids, [])
    again = llm.generate({"prompt": chat(llm, 1, "And this?"), "images": [images[1]]}, GREEDY)[0]
    assert again.token_ids == hf_greedy(hf, again.prompt_token_ids, [images[1]])
    # Without DeepStack the answer differs: the features are not a no-op on this model.
    hf.config.vision_config.deepstack_visual_indexes = []
    hf.model.visual.deepstack_visual_indexes = []
    assert outs[0].token_ids != hf_greedy(hf, outs[0].prompt_token_ids, images)


def test_preempted_image_request_recomputes_the_same_tokens(served: tuple[LLM, Any], tmp_path: Path) -> None:
    """A KV cache too small for three image requests at once: some are preempted and recomputed
    (their images' embeddings from the encoder cache, M-RoPE positions from the prompt again)."""
    llm, hf = served
    small = LLM(llm.engine.loaded.folder, load_format="safetensors", dtype="float32", num_kv_blocks=10, block_size=8,
                max_num_batched_tokens=16, enable_prefix_caching=False)
    prompts: list[Any] = [{"prompt": chat(small, 1, f"Picture {i}?"), "images": [random_image(30 + i)]}
                          for i in range(3)]
    outs = small.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert small.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, prompt["images"], 16)


def test_template_only_in_the_processors_file_is_used(served: tuple[LLM, Any], tmp_path: Path) -> None:
    """A folder whose chat template only its processor saved (chat_template.json) renders image parts."""
    llm, _ = served
    folder = llm.engine.loaded.folder
    copy_folder = tmp_path / "processor-template"
    shutil.copytree(folder, copy_folder)
    jinja = copy_folder / "chat_template.jinja"  # where the tokenizer saved it: moved to the processor's file
    (copy_folder / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}))
    jinja.unlink()
    entry = base_entry(copy_folder, frozenset({2}))
    assert entry.tokenizer.chat_template == llm.tokenizer.chat_template
