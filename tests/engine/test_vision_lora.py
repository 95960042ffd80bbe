"""LoRA on the vision encoder of Qwen2.5-VL, Qwen2-VL and Qwen3-VL per request (FastVisionModel's
get_peft_model with finetune_vision_layers=True): PEFT's greedy tokens for the same image and text,
mixed in one batch with a language-only adapter and the base (each its own PEFT tokens), the same
tokens as the adapter merged at load (--merge-lora), and an encoder cache that never hands one
adapter's encoding of an image to another's request. Modules the tower has no LoRA for are refused
at registration in one line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from vision_models import MAX_TOKENS, hf_greedy, make_qwen2_5_vl, random_image, write_adapter

from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.llm import LLM
from sloth_serve.loader.adapter_config import AdapterError

LANGUAGE_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Every linear of the encoder's blocks and of its mergers (Qwen2-VL's fc1 / fc2, Qwen2.5-VL's gated
# MLP and mlp.0 / mlp.2 merger, Qwen3-VL's linear_fc1 / linear_fc2 and DeepStack mergers)
VISION_LAYERS = r".*visual\..*\.(qkv|attn\.proj|gate_proj|up_proj|down_proj|fc1|fc2|mlp\.0|mlp\.2|linear_fc1|linear_fc2)"
BOTH = rf"{LANGUAGE_LAYERS}|{VISION_LAYERS}"
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def serve(folder: Path, **kwargs: Any) -> LLM:
    # 16 tokens a step: a prompt's image placeholders are split across prefill chunks
    return LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
               max_num_batched_tokens=16, max_loras=2, max_lora_rank=8, **kwargs)


def chat(llm: LLM, question: str) -> str:
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return str(llm.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True))


def peft_greedy(hf: Any, adapter: Path, prompt_ids: list[int], images: list[Any], vision: bool = True) -> list[int]:
    """PEFT's greedy tokens; `vision=False`: with the adapter's vision LoRA zeroed (its language part only)."""
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    if not vision:
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if ".visual." in name and "lora_B" in name:
                    p.zero_()
    return hf_greedy(peft, prompt_ids, images)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Path, Path]:
    """The Qwen2.5-VL folder, transformers' model, an adapter on both sides and a language-only one."""
    root = tmp_path_factory.mktemp("qwen2_5_vl_lora")
    folder, hf = make_qwen2_5_vl(root / "model")
    both = write_adapter(copy.deepcopy(hf), root / "both", BOTH)
    language = write_adapter(copy.deepcopy(hf), root / "language", LANGUAGE_LAYERS)
    return folder, hf, both, language


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_vision_lora_per_request_equals_peft(family: str, tmp_path: Path) -> None:
    folder, hf = make_qwen2_5_vl(tmp_path / "model", **{family: True})
    adapter = write_adapter(copy.deepcopy(hf), tmp_path / "both", BOTH)
    llm = serve(folder)
    llm.adapters.register("both", str(adapter))
    images = [random_image(7)]
    out = llm.generate({"prompt": chat(llm, "What is it?"), "images": images}, GREEDY, adapter="both")[0]
    expected = peft_greedy(hf, adapter, out.prompt_token_ids, images)
    assert out.token_ids == expected
    assert peft_greedy(hf, adapter, out.prompt_token_ids, images, vision=False) != expected  # the tower's LoRA matters


def test_vision_and_language_adapters_mixed_in_one_batch(qwen: tuple[Path, Any, Path, Path]) -> None:
    """One batch: the vision adapter, the language-only one and the base, on one image and on two
    images; each gives its own PEFT (or transformers') tokens. The language-only adapter's images
    share the base's encodings; the vision adapter's are its own."""
    folder, hf, both, language = qwen
    llm = serve(folder)
    llm.adapters.register("both", str(both))
    llm.adapters.register("language", str(language))
    vision = llm.engine.runner.vision
    assert vision is not None
    image = random_image(8)
    prompt = {"prompt": chat(llm, "Describe the colours."), "images": [image]}
    outs = llm.generate([prompt] * 3, GREEDY, adapter=["both", "language", None])
    ids = outs[0].prompt_token_ids
    assert outs[0].token_ids == peft_greedy(hf, both, ids, [image])
    assert outs[1].token_ids == peft_greedy(hf, language, ids, [image])
    assert outs[2].token_ids == hf_greedy(hf, ids, [image])
    assert len({tuple(o.token_ids) for o in outs}) == 3
    assert vision.num_encoded == 2  # one encoding for the vision adapter, one shared by the other two
    assert {key[0] for key in vision.cache} == {0, llm.adapter_id("both")}


def test_encoder_cache_keeps_each_adapters_encoding(qwen: tuple[Path, Any, Path, Path]) -> None:
    """The base encodes an image first (cached, its KV blocks too); the vision adapter's request for
    the same image and text then encodes it again with its LoRA, reuses none of the base's image
    blocks, and gives PEFT's tokens; the base asked again is served from its own caches. Removing the
adapter drops its encodings."""
    folder, hf, both, _ = qwen
    llm = serve(folder)
    llm.adapters.register("both", str(both))
    vision = llm.engine.runner.vision
    assert vision is not None
    image = random_image(9)
    prompt = {"prompt": chat(llm, "What is in the picture?"), "images": [image]}
    base = llm.generate(prompt, GREEDY)[0]
    tuned = llm.generate(prompt, GREEDY, adapter="both")[0]
    assert tuned.token_ids == peft_greedy(hf, both, base.prompt_token_ids, [image]) != base.token_ids
    assert vision.num_encoded == 2 and tuned.num_cached_tokens == 0  # the prefix cache is per adapter too
    again = llm.generate(prompt, GREEDY)[0]
    assert again.token_ids == base.token_ids and again.num_cached_tokens > 0 and vision.num_encoded == 2
    tuned_again = llm.generate(prompt, GREEDY, adapter="both")[0]
    assert tuned_again.token_ids == tuned.token_ids and vision.num_encoded == 2
    llm.engine.remove_lora(llm.adapter_id("both"))  # its encodings go with it; the base's stay
    assert [key[0] for key in vision.cache] == [0] and not vision._deltas


def test_merged_and_per_request_give_the_same_tokens(qwen: tuple[Path, Any, Path, Path]) -> None:
    folder, _, both, _ = qwen
    merged = serve(folder, merge_lora=str(both))
    per_request = serve(folder)
    per_request.adapters.register("both", str(both))
    batch = [{"prompt": chat(merged, question), "images": [random_image(seed)]}
             for seed, question in ((10, "What is it?"), (11, "Which colours are in it?"))]
    outs = [o.token_ids for o in merged.generate(batch, GREEDY)]
    assert outs == [o.token_ids for o in per_request.generate(batch, GREEDY, adapter="both")]
    assert outs != [o.token_ids for o in per_request.generate(batch, GREEDY)]


def test_vision_modules_without_lora_are_refused_in_one_line(qwen: tuple[Path, Any, Path, Path],
                                                             tmp_path: Path) -> None:
    """A Qwen2-VL adapter on Qwen2.5-VL's tower (fc1, which Qwen2.5-VL's blocks lack) and a LoRA on
    the patch embedding's convolution: each refused at registration and at --merge-lora in one line
    naming the module; the engine serves on."""
    folder, hf, _, _ = qwen
    _, qwen2 = make_qwen2_5_vl(tmp_path / "qwen2-vl", qwen2=True)
    other = write_adapter(qwen2, tmp_path / "other", r".*visual\.blocks.*\.fc1")
    conv = write_adapter(copy.deepcopy(hf), tmp_path / "conv", r".*visual\.patch_embed\.proj")
    llm = serve(folder)
    for adapter, message in ((other, r"targets visual\.blocks\.0\.mlp\.fc1, which is no linear layer of this "
                                     r"model's vision tower"),
                             (conv, r"visual\.patch_embed\.proj\.lora_A\.weight has shape \[8, 3, 2, 4, 4\]")):
        with pytest.raises(AdapterError, match=message) as err:
            llm.adapters.register("bad", str(adapter))
        assert "\n" not in str(err.value)
        with pytest.raises(AdapterError, match=message):
            serve(folder, merge_lora=str(adapter))
    image = [random_image(12)]
    out = llm.generate({"prompt": chat(llm, "What is it?"), "images": image}, GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, image)
