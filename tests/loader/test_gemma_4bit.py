"""Gemma through the Unsloth loader (4-bit, CPU backend here): our greedy tokens equal Unsloth's
`for_inference` model on the same folder, for a 16-bit Gemma 2 quantized at load and for a
pre-quantized Gemma3ForConditionalGeneration folder written the way Unsloth's `-bnb-4bit` Gemma 3
repositories are (vision tower kept in 16-bit); its vision tower is served too, in 16-bit."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import pytest
import torch
from quant_formats import compare_greedy, exact_needed
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.unsloth import disk_tensor_names, load_hf_with_unsloth
from sloth_serve.models.layers import LoRALinear

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gemma_families", ROOT / "tests" / "engine" / "test_gemma_families.py")
assert _spec is not None and _spec.loader is not None
families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(families)

MAX_TOKENS = 12
# Logit margin where a near tie may be broken differently: float32 on the CPU, bfloat16 on a GPU.
TIE = {torch.float32: 0.05, torch.bfloat16: 0.25, torch.float16: 0.25}


def with_tokenizer(folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_MODEL / name, folder / name)
    return folder


def prequantized_gemma3(tmp: Path) -> Path:
    """A 4-bit Gemma3ForConditionalGeneration folder (NF4, double quant), its vision tower and
    projector left in 16-bit as Unsloth's Gemma 3 quants leave them."""
    source, _ = families.make_model(tmp, "gemma3-multimodal")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(str(source), quantization_config=config, dtype=torch.float32)
    folder = tmp / "gemma3-bnb-4bit"
    model.save_pretrained(folder)
    return with_tokenizer(folder)


@pytest.mark.parametrize("case", ["gemma2-quantized-at-load", "gemma3-multimodal-prequantized"])
def test_greedy_tokens_equal_unsloth_for_inference(tmp_path: Path, case: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    if case.startswith("gemma2"):
        folder = with_tokenizer(families.make_model(tmp_path, "gemma2")[0])
    else:
        folder = prequantized_gemma3(tmp_path)
    prompts = families.prompts()
    with caplog.at_level(logging.INFO, logger="sloth_serve.loader.unsloth"):
        llm = LLM(folder, num_kv_blocks=128, block_size=8, max_num_batched_tokens=24)
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]
    tie = TIE[llm.engine.loaded.model.model.embed_tokens.weight.dtype]
    projections = [m for m in llm.engine.loaded.model.modules() if isinstance(m, LoRALinear)]
    assert projections and all(m.is_quantized for m in projections)  # every projection served in 4-bit
    if case.startswith("gemma3"):  # its vision tower and projector are served too, in 16-bit
        vision = [k for k in disk_tensor_names(folder) if "vision_tower" in k or "multi_modal_projector" in k]
        served = [n for n, _ in llm.engine.loaded.model.named_parameters()
                  if n.startswith(("vision_tower.", "multi_modal_projector."))]
        assert vision and len(served) == len(vision)
    del llm
    reference = load_hf_with_unsloth(folder, 512)
    if case.startswith("gemma2"):
        # Unsloth's CPU backend (transformers 5.17) runs Gemma 2 under SDPA, which leaves out the
        # attention soft cap (transformers applies it in eager attention only; Unsloth's CUDA Gemma 2
        # path applies it): compare against the model's own math on the same 4-bit weights.
        reference.set_attn_implementation("eager")
    verdicts = [compare_greedy(reference, p, o, tie) for p, o in zip(prompts, ours, strict=True)]
    assert verdicts.count("exact") >= exact_needed(reference, len(verdicts), tie), verdicts  # one near tie at most
