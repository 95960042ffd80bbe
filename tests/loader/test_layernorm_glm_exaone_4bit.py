"""GLM-4, Cohere, StableLM and EXAONE 4.0 through the Unsloth loader (4-bit, CPU backend here): a
16-bit folder quantized at load is served with every projection in NF4, and our greedy tokens equal
Unsloth's `for_inference` model on the same folder (a near tie at most)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from quant_formats import compare_greedy, exact_needed

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.unsloth import load_hf_with_unsloth
from sloth_serve.models.layers import LoRALinear

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "engine"))  # the family tests import each other
MAX_TOKENS = 10
TIE = {torch.float32: 0.05, torch.bfloat16: 0.25, torch.float16: 0.25}


def _module(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "engine" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = {
    "glm4": ("test_glm_families", "glm4"),
    "cohere": ("test_layernorm_families", "cohere"),
    "stablelm": ("test_layernorm_families", "stablelm"),
    "exaone4": ("test_exaone4_family", "hybrid"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_equal_unsloth_for_inference(tmp_path: Path, case: str) -> None:
    tests, name = CASES[case]
    family = _module(tests)
    folder, _ = family.make_model(tmp_path, name)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_MODEL / file, folder / file)
    prompts = family.prompts()
    llm = LLM(folder, num_kv_blocks=128, block_size=8, max_num_batched_tokens=24)
    ours = [
        o.token_ids
        for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    ]
    tie = TIE[llm.engine.loaded.model.model.embed_tokens.weight.dtype]
    projections = [m for m in llm.engine.loaded.model.modules() if isinstance(m, LoRALinear)]
    assert projections and all(m.is_quantized for m in projections)  # every projection served in 4-bit
    del llm
    reference = load_hf_with_unsloth(folder, 512)
    reference.generation_config.eos_token_id = None
    verdicts = [compare_greedy(reference, p, o, tie) for p, o in zip(prompts, ours, strict=True)]
    assert verdicts.count("exact") >= exact_needed(reference, len(verdicts), tie), verdicts  # one near tie at most
