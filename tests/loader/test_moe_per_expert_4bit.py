"""MoE checkpoints whose experts are one bitsandbytes 4-bit linear per expert (how Unsloth's `-bnb-4bit`
MoE uploads, written by transformers 4, store them; Mixtral's as `block_sparse_moe.experts.N.w1/w2/w3`)
load with every expert kept in NF4 as on disk, through Unsloth (transformers 5 loses the experts'
quantization state: they are read from the files) and through `--load-format safetensors`; every tensor
on disk is read, and the greedy tokens equal transformers computing in float32 with exactly the
dequantized weights. The experts are stacked for the grouped NF4 kernels (kernels/moe_nf4.py), so
decode keeps its CUDA graphs on a GPU."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_moe_4bit import write_4bit

from sloth_serve import LLM, SamplingParams
from sloth_serve.models.moe import Experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_moe_families import FAMILIES  # the tiny random MoE configs

PROMPTS = [[5, 17, 99, 200, 3], list(range(10, 40))]
_EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.gate\.weight$")


def quantized(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One weight in bitsandbytes' serialized 4-bit layout (NF4, blocksize 64, nested statistics)."""
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8)
    return {name: packed, **{f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}}


def write_per_expert_4bit(root: Path, family: str, router_4bit: bool = False) -> Path:
    """transformers + bitsandbytes' 4-bit folder of the tiny model (attention in NF4) with each expert
    (and, if asked, the router, a linear layer in transformers 4) quantized as its own 4-bit linear."""
    folder = write_4bit(root, family)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in load_file(str(folder / "model.safetensors")).items():
        if _EXPERT.search(name) or (router_4bit and _ROUTER.search(name)):
            tensors.update(quantized(name, value))
        else:
            tensors[name] = value
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def dequantized_reference(folder: Path, out: Path) -> torch.nn.Module:
    """transformers' model (float32) of the folder with every 4-bit weight dequantized by bitsandbytes."""
    tensors = load_file(str(folder / "model.safetensors"))
    dense: dict[str, torch.Tensor] = {}
    for name in [n for n in tensors if n + ".quant_map" in tensors]:
        parts = {k[len(name) + 1:]: tensors.pop(k) for k in list(tensors) if k.startswith(name + ".")}
        state = bnbf.QuantState.from_dict(parts, device=torch.device("cpu"))
        dense[name] = bnbf.dequantize_4bit(tensors.pop(name), state).float()
    dense.update({k: v.float() for k, v in tensors.items()})
    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    del cfg.quantization_config
    cfg.save_pretrained(out)
    save_file(dense, str(out / "model.safetensors"), metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(("family", "load_format"), [("qwen3_moe", "unsloth"), ("qwen2_moe", "unsloth"),
                                                     ("mixtral", "unsloth"), ("qwen2_moe", "safetensors")])
def test_per_expert_4bit_experts_stay_nf4_and_equal_transformers(tmp_path: Path, family: str,
                                                                 load_format: str) -> None:
    folder = write_per_expert_4bit(tmp_path, family, router_4bit=family == "mixtral")
    llm = LLM(str(folder), num_kv_blocks=64, load_format=load_format)
    experts = [m for m in llm.engine.loaded.model.modules() if isinstance(m, Experts)]
    num = FAMILIES[family][1].get("num_experts") or FAMILIES[family][1]["num_local_experts"]
    assert experts and all(m.is_quantized and len(m.quant) == 3 * num for m in experts)
    # Stacked once for the grouped NF4 kernels (two launches per layer, no host sync): CUDA graphs stay on.
    assert all(m.grouped is not None and m.grouped[0].data.data_ptr() == m.quant[(0, "gate")].data.data_ptr()
               for m in experts)
    assert getattr(llm.engine.loaded.model, "supports_cuda_graphs", True)
    ours = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    del llm
    reference = dequantized_reference(folder, tmp_path / "dense")
    assert [greedy(reference, p) for p in PROMPTS] == ours


def test_per_expert_4bit_folder_missing_an_experts_state_is_refused(tmp_path: Path) -> None:
    folder = write_per_expert_4bit(tmp_path, "qwen2_moe")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight.absmax"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj\.weight: its 4-bit quantization state is incomplete"):
        LLM(str(folder), num_kv_blocks=64, load_format="safetensors")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("load_format", ["unsloth", "safetensors"])
def test_per_expert_4bit_on_the_gpu_decodes_in_cuda_graphs_like_transformers(tmp_path: Path, load_format: str) -> None:
    """The grouped NF4 expert kernels inside the whole model, decode replayed in CUDA graphs, in float32
    so that greedy choices are stable: transformers' tokens on the dequantized weights."""
    folder = write_per_expert_4bit(tmp_path, "qwen3_moe")
    llm = LLM(str(folder), num_kv_blocks=64, load_format=load_format, device="cuda", dtype="float32",
              cuda_graph_sizes=(1, 2, 4))
    assert llm.engine.runner.graphs is not None
    ours = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    del llm
    reference = dequantized_reference(folder, tmp_path / "dense")
    assert [greedy(reference, p) for p in PROMPTS] == ours
