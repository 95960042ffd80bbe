"""Mistral 3 with images through the offline LLM: a tiny random Mistral3ForConditionalGeneration gives
transformers' greedy tokens (PixtralProcessor's prompt ids: rows of [IMG] with [IMG_BREAK] / [IMG_END])
for prompts with one and two images of different sizes and for text only, in one batch, with the
prefill chunked across the images or in one pass, or from prefill graphs for text-only steps;
different images give different outputs, a repeated one is served from the encoder and prefix caches;
LoRA on the language layers and on the tower, per request or merged, equals PEFT;
a bitsandbytes 4-bit folder serves NF4 language layers; Pixtral-12B's LLaVA form is served too."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_vision_models import MAX_TOKENS, chat_text, hf_greedy, make_mistral3, reference_prompt
from peft import PeftModel
from vision_models import random_image, write_adapter

from sloth_serve.api.errors import APIError
from sloth_serve.api.images import expand_images
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.llm import LLM
from sloth_serve.models.families import UnsupportedModel, route_of
from sloth_serve.models.mistral3_vision import Mistral3VisionForCausalLM
from sloth_serve.vision_processor import ImageError

LANGUAGE_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_AND_LANGUAGE = r".*(language_model.*\.(q_proj|v_proj|down_proj)|vision_tower.*\.(q_proj|v_proj|o_proj|up_proj))"
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return make_mistral3(tmp_path_factory.mktemp("mistral3") / "model")


@pytest.fixture(scope="module")
def served(folder: tuple[Path, Any]) -> tuple[LLM, Any]:
    # 16 tokens a step: the images' tokens (15 and 12) are split across prefill chunks
    llm = LLM(folder[0], load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=16, max_loras=2, max_lora_rank=8)
    return llm, folder[1]


def prompts(llm: LLM) -> list[Any]:
    tok = llm.tokenizer
    return [
        {"prompt": chat_text(tok, 2, "Compare the two pictures."), "images": [random_image(1), random_image(2, 17, 33)]},
        chat_text(tok, 0, "No picture here."),
        {"prompt": chat_text(tok, 1, "What is this?"), "images": [random_image(3, 32, 32)]},
    ]


def expected(llm: LLM, hf: Any, batch: list[Any]) -> list[list[int]]:
    return [hf_greedy(hf, reference_prompt(llm.tokenizer, p["prompt"], p["images"]), p["images"])
            if isinstance(p, dict) else hf_greedy(hf, reference_prompt(llm.tokenizer, p, []), []) for p in batch]


def test_images_give_transformers_greedy_tokens_chunked_or_not(served: tuple[LLM, Any], folder: tuple[Path, Any]) -> None:
    llm, hf = served
    assert isinstance(llm.engine.loaded.model, Mistral3VisionForCausalLM)
    batch = prompts(llm)
    outs = llm.generate(batch, GREEDY)
    ids, mm = llm.encode_prompt(batch[0])
    assert ids == reference_prompt(llm.tokenizer, batch[0]["prompt"], batch[0]["images"])
    # 30x20 -> 32x24 pixels: 3 rows of 4 [IMG] + a break/end each; 17x33 -> 16x32: 4 rows of 2 (+1)
    assert mm is not None and [img.num_tokens for img in mm.images] == [15, 12]
    assert llm.vision is not None and llm.vision.num_tokens(30, 20) == 15
    want = expected(llm, hf, batch)
    assert [o.token_ids for o in outs] == want
    whole = LLM(folder[0], load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
                max_num_batched_tokens=512)  # every prompt in one pass
    assert [o.token_ids for o in whole.generate(batch, GREEDY)] == want


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
    ids = reference_prompt(llm.tokenizer, text, images)
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    assert tuned.token_ids == hf_greedy(peft, ids, images)
    assert plain.token_ids == hf_greedy(hf, ids, images) != tuned.token_ids


def test_bad_image_prompts_are_refused(served: tuple[LLM, Any]) -> None:
    llm, _ = served
    text = chat_text(llm.tokenizer, 1, "What is it?")
    with pytest.raises(ValueError, match="1 image placeholder"):
        llm.generate({"prompt": text, "images": [random_image(1), random_image(2)]}, GREEDY)
    ids, mm = llm.encode_prompt({"prompt": text, "images": [random_image(1)]})
    assert mm is not None
    img = mm.images[0]
    broken = list(ids)
    broken[img.offset + 4] = broken[img.offset]  # a row break turned into an image token
    with pytest.raises(ValueError, match="rows of image tokens"):
        llm.engine.add_request("broken", broken, GREEDY, mm=mm)


def test_extreme_aspect_ratio_is_refused_for_its_size(served: tuple[LLM, Any]) -> None:
    """An image whose shorter side scales to no pixels (the tiny model fits images in 32x32 pixels) is
    refused with its size, not blamed on the chat template; one at the limit (1x32) is served."""
    llm, _ = served
    vision = llm.vision
    assert vision is not None
    text = chat_text(llm.tokenizer, 1, "What is it?")
    _, mm = llm.encode_prompt({"prompt": text, "images": [random_image(1, 1, 32)]})
    assert mm is not None and mm.images[0].grid_thw == (1, 8, 2) and vision.num_tokens(1, 32) == mm.images[0].num_tokens
    for width, height in ((1, 3100), (3100, 1), (1, 33)):
        side = "width" if width < height else "height"
        with pytest.raises(ImageError, match=f"{width}x{height} pixels, is too extreme .* its {side} becomes 0 pixels"):
            llm.encode_prompt({"prompt": text, "images": [random_image(1, width, height)]})
        with pytest.raises(ImageError, match="too extreme"):
            vision.num_tokens(width, height)
    prompt_ids = llm.encode(text)
    with pytest.raises(APIError) as caught:
        asyncio.run(expand_images(vision, prompt_ids, [random_image(1, 1, 3100)]))
    assert caught.value.status_code == 400 and caught.value.param == "messages"
    assert "1x3100 pixels" in caught.value.message and "chat template" not in caught.value.message


def test_other_text_models_are_refused_before_weights(folder: tuple[Path, Any]) -> None:
    cfg = json.loads((folder[0] / "config.json").read_text())
    assert route_of(cfg).path == "native"
    cfg["text_config"]["model_type"] = "qwen2"
    with pytest.raises(UnsupportedModel, match="'qwen2' decoder"):
        route_of(cfg)


def test_ministral3_text_model_gives_transformers_greedy_tokens(tmp_path: Path) -> None:
    """Ministral 3 (a Mistral3ForConditionalGeneration whose text model is `ministral3`: YaRN and a
    query scale growing every 16 positions) on our Llama path, with images and text only."""
    folder, hf = make_mistral3(tmp_path / "ministral3", ministral3=True)
    assert route_of(json.loads((folder / "config.json").read_text())).path == "native"
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=16)
    assert llm.engine.loaded.model.config.attn_temperature == (0.5, 16)  # type: ignore[union-attr]
    batch = prompts(llm)
    assert [o.token_ids for o in llm.generate(batch, GREEDY)] == expected(llm, hf, batch)


def test_4bit_checkpoint_serves_nf4_language_and_16bit_vision(folder: tuple[Path, Any], tmp_path: Path) -> None:
    """A bitsandbytes 4-bit folder as Unsloth saves Mistral 3 (the tower and projector left 16-bit), read
    as stored: every language projection served in NF4, the vision side in 16-bit; transformers' greedy
    tokens with the 4-bit weights' values (bitsandbytes' own dequantization)."""
    from bitsandbytes.functional import dequantize_4bit
    from transformers import BitsAndBytesConfig, Mistral3ForConditionalGeneration

    from sloth_serve.models.layers import LoRALinear

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    quantized = Mistral3ForConditionalGeneration.from_pretrained(str(folder[0]), quantization_config=config,
                                                                dtype=torch.float32)
    path = tmp_path / "bnb-4bit"
    quantized.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        (path / name).write_bytes((folder[0] / name).read_bytes())
    reference = copy.deepcopy(folder[1])
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module).__name__ == "Linear4bit":
                weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                reference.get_submodule(name).weight.copy_(weight)
    llm = LLM(path, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=16)
    projections = [m for m in llm.engine.loaded.model.modules() if isinstance(m, LoRALinear)]
    assert projections and all(m.is_quantized for m in projections)
    images = [random_image(7, 40, 24)]
    text = chat_text(llm.tokenizer, 1, "What is it?")
    out = llm.generate({"prompt": text, "images": images}, GREEDY)[0]
    assert out.token_ids == hf_greedy(reference, reference_prompt(llm.tokenizer, text, images), images)


def test_vision_lora_merged_at_load_equals_peft(folder: tuple[Path, Any], tmp_path: Path) -> None:
    """An adapter on the language layers and the Pixtral tower (finetune_vision_layers=True), merged
    with --merge-lora: PEFT's tokens for the same image."""
    path, hf = folder
    adapter = write_adapter(copy.deepcopy(hf), tmp_path / "both", VISION_AND_LANGUAGE)
    llm = LLM(path, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=64, merge_lora=str(adapter))
    images = [random_image(6)]
    text = chat_text(llm.tokenizer, 1, "What is it?")
    ids = reference_prompt(llm.tokenizer, text, images)
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    expected = hf_greedy(peft, ids, images)
    assert llm.generate({"prompt": text, "images": images}, GREEDY)[0].token_ids == expected
    with torch.no_grad():  # the tower's LoRA changes the answer: a merge leaving it out would fail
        for name, p in peft.named_parameters():
            if "vision_tower" in name and "lora_B" in name:
                p.zero_()
    assert hf_greedy(peft, ids, images) != expected


def test_pixtral_llava_gives_transformers_greedy_tokens(tmp_path: Path) -> None:
    """Pixtral-12B's form (LlavaForConditionalGeneration with a Pixtral tower): no patch merge (a row
    per 4-pixel patch row), LLaVA's projector; one and two images and text only, chunked across images."""
    folder, hf = make_mistral3(tmp_path / "pixtral", llava=True)
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=32)
    assert isinstance(llm.engine.loaded.model, Mistral3VisionForCausalLM)
    batch = prompts(llm)
    outs = llm.generate(batch, GREEDY)
    refs = [reference_prompt(llm.tokenizer, p["prompt"] if isinstance(p, dict) else p,
                             p["images"] if isinstance(p, dict) else [], merge=1) for p in batch]
    assert [o.prompt_token_ids for o in outs] == refs
    assert [o.token_ids for o in outs] == [hf_greedy(hf, ids, p["images"] if isinstance(p, dict) else [], merge=1)
                                           for ids, p in zip(refs, batch, strict=True)]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"] = {"model_type": "clip_vision_model"}
    with pytest.raises(UnsupportedModel, match="Pixtral tower"):
        route_of(cfg)


def test_vision_lora_per_request_mixed_with_the_base_equals_peft(folder: tuple[Path, Any], tmp_path: Path) -> None:
    """The same kind of adapter (Pixtral tower, projector linears and language layers) per request,
    in one batch with the base: PEFT's tokens and transformers', one encoding of the image each."""
    path, hf = folder
    adapter = write_adapter(copy.deepcopy(hf), tmp_path / "both", VISION_AND_LANGUAGE + r"|.*multi_modal_projector\.linear_1")
    llm = LLM(path, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=64, max_loras=2, max_lora_rank=8)
    llm.adapters.register("both", str(adapter))
    images = [random_image(6)]
    text = chat_text(llm.tokenizer, 1, "What is it?")
    ids = reference_prompt(llm.tokenizer, text, images)
    tuned, plain = llm.generate([{"prompt": text, "images": images}] * 2, GREEDY, adapter=["both", None])
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    assert tuned.token_ids == hf_greedy(peft, ids, images)
    assert plain.token_ids == hf_greedy(hf, ids, images) != tuned.token_ids
    vision = llm.engine.runner.vision
    assert vision is not None and vision.num_encoded == 2


def test_text_steps_replay_prefill_graphs_image_steps_run_eagerly(folder: tuple[Path, Any]) -> None:
    """Prompt steps from prefill graphs (their packing replayed on the CPU): steps without image
    tokens replay, steps with some run eagerly (embeddings spliced); transformers' tokens."""
    from test_prefill_graphs import ReplayedOnCPU

    path, hf = folder
    llm = LLM(path, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8, max_num_seqs=4,
              max_num_batched_tokens=64)
    runner = llm.engine.runner
    graphs = runner.prefill_graphs = ReplayedOnCPU(runner._forward_logits_at, [16, 32, 64], 4,
                                                   -(-llm.engine.max_model_len // 8), 8, runner.device)
    runner.capture_graphs()
    batch = prompts(llm)
    assert [o.token_ids for o in llm.generate(batch, GREEDY)] == expected(llm, hf, batch)
    assert graphs.num_replays >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float32_on_the_triton_kernels_equals_transformers(folder: tuple[Path, Any]) -> None:
    """The same prompts on CUDA: Triton prefill attention, the Pixtral tower on the GPU, the decode
    steps replayed from CUDA graphs; transformers' tokens (its model on the CPU)."""
    llm = LLM(folder[0], load_format="safetensors", dtype="float32", device="cuda", num_kv_blocks=64, block_size=16,
              max_num_batched_tokens=16)
    assert llm.engine.runner.graphs is not None
    batch = prompts(llm)
    assert [o.token_ids for o in llm.generate(batch, GREEDY)] == expected(llm, folder[1], batch)
