"""Gemma 3 with images through the offline LLM: a tiny random Gemma3ForConditionalGeneration gives
transformers' greedy tokens (its processor's prompt ids, its bidirectional attention among an image's
tokens) for prompts with one and two images and for text only, in one batch, whether the prefill is
chunked around the images or runs in one pass; different images give different outputs, a repeated
one is served from the encoder and prefix caches; LoRA on the language layers (FastVisionModel's
get_peft_model) per request equals PEFT, and so does one that also trains the vision tower, per request
(mixed in a batch with a language-only one) or merged at load."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from gemma3_vision_models import MAX_TOKENS, chat_text, hf_greedy, make_gemma3_vl, reference
from peft import PeftModel
from vision_models import random_image, write_adapter

from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.llm import LLM
from sloth_serve.models.gemma_vision import GemmaVisionForCausalLM

LANGUAGE_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_AND_LANGUAGE = r".*(language_model.*\.(q_proj|v_proj|down_proj)|vision_tower.*\.(q_proj|v_proj|out_proj|fc1))"
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return make_gemma3_vl(tmp_path_factory.mktemp("gemma3_vl") / "model")


@pytest.fixture(scope="module")
def served(folder: tuple[Path, Any]) -> tuple[LLM, Any]:
    # 24 tokens a step: a prompt is chunked, each chunk stopping before an image (16 tokens) it cannot hold
    llm = LLM(folder[0], load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=24, max_loras=2, max_lora_rank=8)
    return llm, folder[1]


def prompts(llm: LLM) -> list[Any]:
    tok = llm.tokenizer
    return [
        {"prompt": chat_text(tok, 2, "Compare the two pictures."), "images": [random_image(1), random_image(2, 17, 33)]},
        chat_text(tok, 0, "No picture here."),
        {"prompt": chat_text(tok, 1, "What is this?"), "images": [random_image(3, 32, 32)]},
    ]


def test_images_give_transformers_greedy_tokens_chunked_or_not(served: tuple[LLM, Any], folder: tuple[Path, Any]) -> None:
    llm, hf = served
    assert isinstance(llm.engine.loaded.model, GemmaVisionForCausalLM)
    batch = prompts(llm)
    outs = llm.generate(batch, GREEDY)
    ids, mm = llm.encode_prompt(batch[0])
    assert ids == reference(llm.tokenizer, batch[0]["prompt"], batch[0]["images"])["input_ids"][0].tolist()
    assert mm is not None and [img.num_tokens for img in mm.images] == [16, 16]
    expected = [hf_greedy(hf, llm.tokenizer, p["prompt"], p["images"]) if isinstance(p, dict)
                else hf_greedy(hf, llm.tokenizer, p, []) for p in batch]
    assert [o.token_ids for o in outs] == expected
    whole = LLM(folder[0], load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
                max_num_batched_tokens=512)  # every prompt in one pass
    assert [o.token_ids for o in whole.generate(batch, GREEDY)] == expected


def test_image_tokens_attend_both_ways(served: tuple[LLM, Any]) -> None:
    """Causal attention over the image tokens (key ends left out) gives other tokens than transformers'."""
    llm, hf = served
    small = LLM(llm.engine.loaded.folder, load_format="safetensors", dtype="float32", num_kv_blocks=96,
                block_size=8, enable_prefix_caching=False)
    vision = small.engine.runner.vision
    assert vision is not None
    batch = [{"prompt": chat_text(llm.tokenizer, 1, "What is it?"), "images": [random_image(s)]} for s in (40, 41)]
    vision.bidirectional = False
    causal = small.generate(batch, GREEDY)
    expected = [hf_greedy(hf, llm.tokenizer, p["prompt"], p["images"]) for p in batch]
    assert [o.token_ids for o in causal] != expected


def test_image_content_decides_output_and_caches(served: tuple[LLM, Any]) -> None:
    llm, _ = served
    vision = llm.engine.runner.vision
    assert vision is not None
    text = chat_text(llm.tokenizer, 1, "Describe the colours in this image, please, in some detail.")
    first = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    encoded = vision.num_encoded
    other = llm.generate({"prompt": text, "images": [random_image(11)]}, GREEDY)[0]
    assert other.prompt_token_ids == first.prompt_token_ids and other.token_ids != first.token_ids
    offset = llm.encode_prompt({"prompt": text, "images": [random_image(11)]})[1].images[0].offset  # type: ignore[union-attr]
    assert other.num_cached_tokens <= offset  # nothing of the other image's blocks reused
    assert vision.num_encoded == encoded + 1
    again = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens > offset and vision.num_encoded == encoded + 1


def test_language_lora_per_request_equals_peft(served: tuple[LLM, Any], tmp_path: Path) -> None:
    llm, hf = served
    adapter = write_adapter(copy.deepcopy(hf), tmp_path / "tuned", LANGUAGE_LAYERS)
    llm.adapters.register("tuned", str(adapter))
    images = [random_image(5)]
    text = chat_text(llm.tokenizer, 1, "What is it?")
    tuned, plain = llm.generate([{"prompt": text, "images": images}] * 2, GREEDY, adapter=["tuned", None])
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    assert tuned.token_ids == hf_greedy(peft, llm.tokenizer, text, images)
    assert plain.token_ids == hf_greedy(hf, llm.tokenizer, text, images) != tuned.token_ids


def test_vision_lora_per_request_mixed_with_language_lora_equals_peft(folder: tuple[Path, Any], tmp_path: Path) -> None:
    """An adapter on the SigLIP tower and the language layers, one on the language layers only, and
    the base in one batch: each PEFT's (or transformers') tokens; the language-only adapter's image
    shares the base's encoding, the vision adapter's is its own (and stays its own when asked again)."""
    path, hf = folder
    both = write_adapter(copy.deepcopy(hf), tmp_path / "both", VISION_AND_LANGUAGE)
    language = write_adapter(copy.deepcopy(hf), tmp_path / "language", LANGUAGE_LAYERS)
    llm = LLM(path, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=64, max_loras=2, max_lora_rank=8)
    llm.adapters.register("both", str(both))
    llm.adapters.register("language", str(language))
    vision = llm.engine.runner.vision
    assert vision is not None
    images = [random_image(7)]
    text = chat_text(llm.tokenizer, 1, "What is it?")
    base_first = llm.generate({"prompt": text, "images": images}, GREEDY)[0]  # the base's encoding cached first
    outs = llm.generate([{"prompt": text, "images": images}] * 3, GREEDY, adapter=["both", "language", None])
    expected = [hf_greedy(PeftModel.from_pretrained(copy.deepcopy(hf), str(a)).eval(), llm.tokenizer, text, images)
                for a in (both, language)]
    assert [o.token_ids for o in outs] == [*expected, base_first.token_ids]
    assert len({tuple(o.token_ids) for o in outs}) == 3 and vision.num_encoded == 2
    without_tower = PeftModel.from_pretrained(copy.deepcopy(hf), str(both)).eval()
    with torch.no_grad():  # the tower's LoRA changes this answer: serving the adapter without it would fail
        for name, p in without_tower.named_parameters():
            if "vision_tower" in name and "lora_B" in name:
                p.zero_()
    assert hf_greedy(without_tower, llm.tokenizer, text, images) != expected[0]
    merged = LLM(path, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
                 max_num_batched_tokens=64, merge_lora=str(both))
    assert merged.generate({"prompt": text, "images": images}, GREEDY)[0].token_ids == outs[0].token_ids


def test_vision_lora_merged_at_load_equals_peft(folder: tuple[Path, Any], tmp_path: Path) -> None:
    """An adapter on the language layers and the vision tower (FastVisionModel's
    finetune_vision_layers=True), merged with --merge-lora: PEFT's tokens for the same image."""
    path, hf = folder
    adapter = write_adapter(copy.deepcopy(hf), tmp_path / "both", VISION_AND_LANGUAGE)
    llm = LLM(path, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=64, merge_lora=str(adapter))
    images = [random_image(6)]
    text = chat_text(llm.tokenizer, 1, "What is it?")
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    expected = hf_greedy(peft, llm.tokenizer, text, images)
    assert llm.generate({"prompt": text, "images": images}, GREEDY)[0].token_ids == expected
    language_only = copy.deepcopy(peft)
    with torch.no_grad():  # the vision tower's LoRA changes the answer: a merge leaving it out would fail
        for name, p in language_only.named_parameters():
            if "vision_tower" in name and "lora_B" in name:
                p.zero_()
    assert hf_greedy(language_only, llm.tokenizer, text, images) != expected


def test_bad_image_prompts_are_refused(served: tuple[LLM, Any]) -> None:
    llm, _ = served
    text = chat_text(llm.tokenizer, 1, "What is it?")
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": text, "images": [random_image(1), random_image(2)]}, GREEDY)
    small = LLM(llm.engine.loaded.folder, load_format="safetensors", dtype="float32", num_kv_blocks=32, block_size=8,
                max_num_batched_tokens=12)
    with pytest.raises(ValueError, match="image of 16 tokens does not fit one step"):
        small.generate({"prompt": text, "images": [random_image(1)]}, GREEDY)


def test_prefix_cache_hit_ending_inside_an_image(served: tuple[LLM, Any]) -> None:
    """Two questions about one image: the second prompt's cached blocks end inside the image (16-token
    blocks, the image at tokens 5-20), so its first step starts there, its image tokens seeing the
    cached ones and each other; transformers' tokens all the same."""
    llm, hf = served
    small = LLM(llm.engine.loaded.folder, load_format="safetensors", dtype="float32", num_kv_blocks=32,
                block_size=16, max_num_batched_tokens=64)
    image = [random_image(50)]
    for question in ("What is it?", "Which colours are in it?"):
        text = chat_text(llm.tokenizer, 1, question)
        out = small.generate({"prompt": text, "images": image}, GREEDY)[0]
        assert out.token_ids == hf_greedy(hf, llm.tokenizer, text, image)
    mm = small.encode_prompt({"prompt": text, "images": image})[1]
    assert mm is not None and mm.images[0].offset < 16 < mm.images[0].offset + 16
    assert out.num_cached_tokens == 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float32_on_the_triton_kernels_equals_transformers(folder: tuple[Path, Any]) -> None:
    """The same prompts on CUDA: Triton prefill attention with key ends, the decode steps replayed
    from CUDA graphs; transformers' tokens (its model on the CPU)."""
    llm = LLM(folder[0], load_format="safetensors", dtype="float32", device="cuda", num_kv_blocks=64, block_size=16,
              max_num_batched_tokens=24)
    assert llm.engine.runner.graphs is not None
    batch = prompts(llm)
    outs = llm.generate(batch, GREEDY)
    expected = [hf_greedy(folder[1], llm.tokenizer, p["prompt"], p["images"]) if isinstance(p, dict)
                else hf_greedy(folder[1], llm.tokenizer, p, []) for p in batch]
    assert [o.token_ids for o in outs] == expected


def test_text_steps_replay_prefill_graphs_image_steps_run_eagerly(folder: tuple[Path, Any]) -> None:
    """Prompt steps from prefill graphs (their packing replayed on the CPU): steps without image
    tokens replay, steps with some run eagerly (embeddings spliced, key ends); transformers' tokens."""
    from test_prefill_graphs import ReplayedOnCPU

    path, hf = folder
    llm = LLM(path, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8, max_num_seqs=4,
              max_num_batched_tokens=64)
    runner = llm.engine.runner
    graphs = runner.prefill_graphs = ReplayedOnCPU(runner._forward_logits_at, [16, 32, 64], 4,
                                                   -(-llm.engine.max_model_len // 8), 8, runner.device)
    runner.capture_graphs()
    batch = prompts(llm)
    outs = llm.generate(batch, GREEDY)
    expected = [hf_greedy(hf, llm.tokenizer, p["prompt"], p["images"]) if isinstance(p, dict)
                else hf_greedy(hf, llm.tokenizer, p, []) for p in batch]
    assert [o.token_ids for o in outs] == expected
    assert graphs.num_replays >= 1
