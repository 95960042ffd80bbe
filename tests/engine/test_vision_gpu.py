"""Image-text models on the GPU (run through the device tool): the tiny random Qwen2.5-VL on the
Triton kernels in float32 gives transformers' greedy tokens, its decode steps replayed from CUDA
graphs; loaded in 4-bit through Unsloth's FastVisionModel (the default --load-format), its language
linears stay packed NF4 on our kernels and every token we pick is the 4-bit reference's own greedy
choice with the same image, up to a near tie."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from vision_models import MAX_TOKENS, hf_greedy, image_processor, make_qwen2_5_vl, random_image

from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.llm import LLM
from sloth_serve.models.generic_linear import GenericLinear
from sloth_serve.models.vision import VisionCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
TIE_BF16 = 0.25  # logit gap under which the 4-bit reference itself is undecided


def chat(llm: LLM, question: str) -> str:
    return str(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], tokenize=False,
        add_generation_prompt=True))


def test_float32_on_the_triton_kernels_equals_transformers(tmp_path: Path) -> None:
    folder, hf = make_qwen2_5_vl(tmp_path / "model")
    llm = LLM(folder, load_format="safetensors", dtype="float32", device="cuda", num_kv_blocks=64, block_size=16,
              max_num_batched_tokens=16)
    assert llm.engine.runner.graphs is not None  # the decode steps replay CUDA graphs
    images = [[random_image(1)], [random_image(2, 32, 32)]]
    outs = llm.generate([{"prompt": chat(llm, "What is it?"), "images": i} for i in images], GREEDY)
    for out, imgs in zip(outs, images, strict=True):
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, imgs)


def reference_gaps(reference: Any, prompt: list[int], images: list[Any], ours: list[int]) -> list[float]:
    """For each token we generated: how far below the reference's best logit it is (0: its choice),
    the reference fed the same image and our tokens (teacher forcing)."""
    ids = torch.tensor([prompt + ours], device="cuda")
    batch = image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        logits = reference(input_ids=ids, pixel_values=batch["pixel_values"].cuda(),
                           image_grid_thw=batch["image_grid_thw"].cuda(),
                           mm_token_type_ids=(ids == reference.config.image_token_id).int()).logits[0].float()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(ours)]
    return [float(row.max() - row[t]) for row, t in zip(rows, ours, strict=True)]


def test_unsloth_4bit_keeps_nf4_and_follows_fastvisionmodel(tmp_path: Path) -> None:
    folder, _ = make_qwen2_5_vl(tmp_path / "model")
    llm = LLM(folder, num_kv_blocks=64, block_size=16, max_num_batched_tokens=64)  # Unsloth, 4-bit
    model = llm.engine.loaded.model
    # decode steps replay CUDA graphs (a capture that failed would have left them eager, graphs None)
    assert isinstance(model, VisionCausalLM) and llm.engine.runner.graphs is not None
    language = [m for m in model.text.modules() if isinstance(m, GenericLinear)]
    assert language and all(m.is_quantized for m in language)
    images = [[random_image(1)], [random_image(3)]]
    outs = llm.generate([{"prompt": chat(llm, "Describe it."), "images": i} for i in images], GREEDY)
    assert outs[0].token_ids != outs[1].token_ids
    del llm, model
    from sloth_serve.loader.unsloth import load_hf_with_unsloth

    reference = load_hf_with_unsloth(folder, 256, vision=True)
    for out, imgs in zip(outs, images, strict=True):
        gaps = reference_gaps(reference, out.prompt_token_ids, imgs, out.token_ids)
        assert max(gaps) <= TIE_BF16, gaps
