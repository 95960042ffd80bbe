"""Phi-3 / Phi-4-mini checkpoints (q|k|v and gate|up fused on disk) through the 4-bit Unsloth path and
with PEFT LoRA adapters trained on the fused modules: our greedy tokens equal Unsloth's `for_inference`
(4-bit) and PEFT's (adapters hot-swapped in one batch with the base, and merged at load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from phi3_models import write_phi3
from quant_formats import compare_greedy, exact_needed
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader.checkpoint import load_model
from sloth_serve.loader.peft import check_fits, load_lora
from sloth_serve.loader.unsloth import load_hf_with_unsloth
from sloth_serve.models.layers import LoRALinear

MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


def prompts(n: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    # 70 tokens: past phi4-mini's original context of 64 (longrope's long factors from the start)
    return [torch.randint(3, 4096, (length,), generator=gen).tolist() for length in (5, 23, 70)[:n]]


@pytest.mark.parametrize("shape", ["phi4-mini", "phi3-mini"])
def test_4bit_greedy_equals_unsloth_for_inference(tmp_path: Path, shape: str) -> None:
    folder = write_phi3(tmp_path / shape, shape)
    llm = LLM(folder, num_kv_blocks=64, block_size=8, max_num_batched_tokens=32)  # --load-format unsloth
    ours = [o.token_ids for o in llm.generate(prompts(), SamplingParams(max_tokens=MAX_NEW, temperature=0))]
    model = llm.engine.loaded.model
    qkv, gate_up = model.model.layers[0].self_attn.qkv_proj, model.model.layers[0].mlp.gate_up_proj
    # bitsandbytes quantized each fused projection as one weight: adopted as it is, never made dense
    for layer in (qkv, gate_up):
        assert isinstance(layer, LoRALinear) and layer.is_quantized and layer.fused_quant is not None
        assert tuple(layer.fused_quant.shape) == (sum(layer.out_slices), layer.in_features)
    if shape == "phi4-mini":  # slices on whole blocks: per-slice views into the same bytes
        assert qkv.quant is not None and [q.shape[0] for q in qkv.quant if q is not None] == qkv.out_slices
        assert qkv.quant[0] is not None and qkv.quant[0].data.data_ptr() == qkv.fused_quant.data.data_ptr()
    tie = 0.05 if model.model.embed_tokens.weight.dtype == torch.float32 else 0.25
    del llm
    reference = load_hf_with_unsloth(folder, 512)
    verdicts = [compare_greedy(reference, p, o, tie) for p, o in zip(prompts(), ours, strict=True)]
    assert verdicts.count("exact") >= exact_needed(reference, len(verdicts), tie), verdicts  # one near tie at most


TARGETS = ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"]  # what PEFT can target on a Phi-3


def write_adapter(base: Path, folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():  # a fresh adapter is a no-op: random B so that it changes the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(folder))
    return folder


@torch.no_grad()
def peft_tokens(base: Path, adapter: Path | None, prompt_ids: list[list[int]]) -> list[list[int]]:
    """PEFT's greedy tokens, the whole sequence recomputed each step (the plainest reference)."""
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    out = []
    for prompt in prompt_ids:
        ids = list(prompt)
        for _ in range(MAX_NEW):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        out.append(ids[len(prompt):])
    return out


@pytest.fixture(scope="module")
def lora_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("phi3-lora")
    base = write_phi3(root / "base", "phi4-mini", dtype=torch.float32)
    return base, {name: write_adapter(base, root / name, seed) for seed, name in enumerate(("a", "b"))}


def test_fused_module_adapter_is_split_per_slice(lora_case: tuple[Path, dict[str, Path]]) -> None:
    """PEFT's A [r, in] and B [q + k + v, r] on qkv_proj become one LoRA per slice: each slice gets
    the module's A and its own rows of B (scale folded in)."""
    base, adapters = lora_case
    layers = load_model(base, torch.float32, torch.device("cpu")).lora_layers()
    weights = load_lora("a", adapters["a"], 16)
    check_fits(weights, layers)
    raw = load_file(str(adapters["a"] / "adapter_model.safetensors"))
    for module in ("model.layers.1.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"):
        key = f"base_model.model.{module}"
        a, b = raw[f"{key}.lora_A.weight"], raw[f"{key}.lora_B.weight"] * 16 / 8  # lora_alpha / r
        sizes = layers[module].out_slices
        assert len(sizes) > 1
        for i, rows in enumerate(b.split(sizes)):
            ours_a, ours_b = weights.tensors[(module, i)]
            assert torch.equal(ours_a, a) and torch.equal(ours_b, rows)
    assert not any(index < 0 for _, index in weights.tensors)


def test_adapters_hot_swapped_and_merged_equal_peft(lora_case: tuple[Path, dict[str, Path]]) -> None:
    base, adapters = lora_case
    prompt_ids = prompts(2)
    llm = LLM(base, load_format="safetensors", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
              max_loras=2, max_num_batched_tokens=32)
    for name, folder in adapters.items():
        llm.adapters.register(name, folder)
    names: list[str | None] = [None, "a", "b"]
    batch = [(name, p) for name in names for p in prompt_ids]
    outs = llm.generate([p for _, p in batch], GREEDY, adapter=[name for name, _ in batch])
    got: dict[str | None, list[list[int]]] = {name: [] for name in names}
    for (name, _), out in zip(batch, outs, strict=True):
        got[name].append(out.token_ids)
    for name in names:
        assert got[name] == peft_tokens(base, adapters[name] if name else None, prompt_ids), name
    assert got["a"] != got[None] and got["b"] != got[None] and got["a"] != got["b"]  # the adapters matter
    del llm
    merged = LLM(base, load_format="safetensors", dtype="float32", device="cpu", num_kv_blocks=64,
                 merge_lora=str(adapters["a"]))
    assert [o.token_ids for o in merged.generate(prompt_ids, GREEDY)] == got["a"]
