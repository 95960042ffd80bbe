"""Write a pre-quantized bitsandbytes NF4 checkpoint of random weights straight from a transformers
config: every tensor's name and shape come from the model class built on the meta device, each
linear weight is drawn and quantized on the device (blocksize 64, double quant, as Unsloth's
`-bnb-4bit` uploads), and the bytes are saved in bitsandbytes' serialized layout (`weight` plus its
`absmax`, `quant_map`, `nested_*` and `quant_state.bitsandbytes__nf4` tensors). No 16-bit copy is
written or read back, so an 8B model is built in seconds rather than a quantizing load.

Mixture-of-experts experts are written one linear per expert (`experts.<e>.gate_proj.weight` ...),
the layout of Unsloth's 4-bit MoE uploads; experts a shape keeps in 16-bit stay as transformers holds
them (3-D tensors)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

BLOCKSIZE = 64
# transformers 5's fused 3-D experts -> the per-expert linears a 4-bit checkpoint stores ([out, in] each).
_PER_EXPERT_MODEL_TYPES = frozenset({"qwen3_moe", "qwen2_moe", "mixtral"})


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]
    kind: str  # "nf4" (a linear weight, quantized), "norm" (ones; zeros for (1 + w) norms), "dense" (random 16-bit)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


def tensor_specs(cfg: Any, skip_modules: tuple[str, ...], nf4_experts: bool = True) -> list[TensorSpec]:
    """Every tensor of the checkpoint of `cfg` (a transformers config) in state-dict order;
    `nf4_experts` False keeps MoE experts 16-bit (fused 3-D, as transformers + bitsandbytes leave them)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    per_expert = nf4_experts and cfg.model_type in _PER_EXPERT_MODEL_TYPES
    specs: list[TensorSpec] = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue  # tied: the embedding is the output projection
        dims = tuple(t.shape)
        if per_expert and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            specs += _expert_specs(name, dims)
        elif name in linears and not any(s in name for s in skip_modules):
            specs.append(TensorSpec(name, dims, "nf4"))
        else:
            specs.append(TensorSpec(name, dims, "norm" if len(dims) == 1 and "norm" in name else "dense"))
    del model
    return specs


def _expert_specs(name: str, dims: tuple[int, ...]) -> list[TensorSpec]:
    """gate_up_proj [E, 2I, H] -> per expert gate_proj and up_proj [I, H]; down_proj [E, H, I] -> [H, I]."""
    prefix = name.rsplit(".", 1)[0]
    num, rows, cols = dims
    if name.endswith("gate_up_proj"):
        return [TensorSpec(f"{prefix}.{e}.{p}.weight", (rows // 2, cols), "nf4")
                for e in range(num) for p in ("gate_proj", "up_proj")]
    return [TensorSpec(f"{prefix}.{e}.down_proj.weight", (rows, cols), "nf4") for e in range(num)]


def stored_bytes(spec: TensorSpec) -> int:
    """Bytes on disk: half a byte per NF4 value plus about 1.1% for its block statistics; bf16 else."""
    return spec.numel // 2 + spec.numel // 64 if spec.kind == "nf4" else 2 * spec.numel


def make_tensors(spec: TensorSpec, gen: torch.Generator, device: torch.device, std: float,
                 norm_value: float) -> Iterator[tuple[str, torch.Tensor]]:
    """The host tensors of one spec: bf16 for dense / norm, bitsandbytes' serialized NF4 otherwise."""
    if spec.kind == "norm":
        yield spec.name, torch.full(spec.dims, norm_value, dtype=torch.bfloat16)
        return
    t = torch.randn(spec.dims, generator=gen, device=device, dtype=torch.bfloat16).mul_(std)
    if spec.kind == "dense":
        yield spec.name, t.cpu()
        return
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(t, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8)
    yield spec.name, packed.cpu()
    for part, value in state.as_dict(packed=True).items():
        yield f"{spec.name}.{part}", value.cpu()


def quantization_config(skip_modules: tuple[str, ...]) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=list(skip_modules))
    return cfg.to_dict()


def write_nf4_checkpoint(cfg: Any, skip_modules: tuple[str, ...], out: Path, device: torch.device, seed: int,
                         std: float, shard_gb: float, nf4_experts: bool = True) -> int:
    """Weights (shard by shard, one in host memory at a time) and config.json with its
    quantization_config; returns the number of parameters."""
    specs = tensor_specs(cfg, skip_modules, nf4_experts)
    norm_value = 0.0 if cfg.model_type.startswith("gemma") else 1.0  # Gemma scales by (1 + w)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + stored_bytes(spec) > shard_gb * 2**30:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += stored_bytes(spec)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: v for spec in shard for k, v in make_tensors(spec, gen, device, std, norm_value)}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        print(f"  wrote {fname} ({i + 1}/{len(shards)})", file=sys.stderr, flush=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.quantization_config = quantization_config(skip_modules)
    cfg.save_pretrained(out)
    return sum(s.numel for s in specs)
