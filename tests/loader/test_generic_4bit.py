"""The generic path through the Unsloth loader (4-bit, CPU backend here): a 16-bit Cohere folder
quantized at load keeps every projection in NF4 on our kernels, and our greedy tokens equal Unsloth's
`for_inference` model on the same folder (a near tie may break either way: compare_greedy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from quant_formats import compare_greedy, exact_needed

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader.unsloth import load_hf_with_unsloth
from sloth_serve.models.generic import GenericCausalLM
from sloth_serve.models.generic_linear import GenericLinear

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("generic_path", ROOT / "tests" / "engine" / "test_generic_path.py")
assert _spec is not None and _spec.loader is not None
generic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generic)

MAX_TOKENS = 12
TIE = {torch.float32: 0.05, torch.bfloat16: 0.25, torch.float16: 0.25}


def test_cohere_in_4bit_through_unsloth_equals_unsloth_for_inference(tmp_path: Path) -> None:
    folder, _ = generic.make_model(tmp_path, "cohere", tokenizer=True)
    llm = LLM(folder, num_kv_blocks=128, block_size=8, max_num_batched_tokens=24)  # the default: Unsloth, 4-bit
    model = llm.engine.loaded.model
    assert isinstance(model, GenericCausalLM)
    projections = [m for m in model.backbone.modules() if isinstance(m, GenericLinear)]
    assert len(projections) == 2 * 7 and all(m.is_quantized and m.weight is None for m in projections)
    prompts = generic.prompts()
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]
    tie = TIE[llm.engine.dtype]
    del llm
    reference = load_hf_with_unsloth(folder, 256)
    results = [compare_greedy(reference, p, o, tie) for p, o in zip(prompts, ours, strict=True)]
    assert results.count("exact") >= exact_needed(reference, len(prompts), tie), results  # at most one near tie among them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generic_path_on_the_gpu_runs_eagerly_and_equals_transformers(tmp_path: Path) -> None:
    """bfloat16 on the Triton kernels, sliding-window and global layers (Cohere 2): no CUDA graphs,
    transformers' greedy tokens up to near ties."""
    folder, hf = generic.make_model(tmp_path, "cohere2", tokenizer=True)
    llm = LLM(folder, load_format="safetensors", dtype="bfloat16", num_kv_blocks=128, block_size=16,
              max_num_batched_tokens=24)
    assert isinstance(llm.engine.loaded.model, GenericCausalLM) and llm.engine.runner.graphs is None
    prompts = generic.prompts()
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]
    del llm
    reference = hf.to("cuda", torch.bfloat16)
    results = [compare_greedy(reference, p, o, TIE[torch.bfloat16]) for p, o in zip(prompts, ours, strict=True)]
    assert results.count("exact") >= len(prompts) - 1, results
