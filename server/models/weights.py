"""Fill our model from a Hugging Face checkpoint folder (safetensors), fusing q|k|v and gate|up (or
taking them fused, as Phi-3 stores them); the model class is the config's family's (Llama-like or Gemma)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from sloth_kernels.rope import rope_tables

from .config import ModelConfig
from .exaone4 import Exaone4ForCausalLM
from .falcon_h1 import FalconH1ForCausalLM
from .fused_names import fused_target
from .gemma import GemmaForCausalLM, gemma_rope_tables
from .gemma_config import GEMMA_FAMILIES
from .gemma_vision import GemmaVisionForCausalLM, vision_module_name
from .glm import Glm4ForCausalLM
from .gpt_oss import GptOssForCausalLM
from .granite_hybrid import GraniteMoeHybridForCausalLM
from .layernorm import LayerNormForCausalLM
from .layers import LoRALinear
from .lfm2 import Lfm2ForCausalLM
from .llama import LlamaForCausalLM
from .mistral3_vision import Mistral3VisionForCausalLM
from .moe import Experts, load_expert_weight, moe_checkpoint_name, settle_experts
from .qwen3_5 import Qwen3_5ForCausalLM
from .qwen3_5_vision import Qwen3_5VisionForCausalLM

if TYPE_CHECKING:
    from sloth_kernels.nf4_format import NF4Weight

logger = logging.getLogger(__name__)

CausalLM = (LlamaForCausalLM | GemmaForCausalLM | Lfm2ForCausalLM | Qwen3_5ForCausalLM
            | GraniteMoeHybridForCausalLM | FalconH1ForCausalLM)

# Natively served image-text models: their vision tower and projector are loaded beside the text model.
NATIVE_VISION = (GemmaVisionForCausalLM, Mistral3VisionForCausalLM, Qwen3_5VisionForCausalLM)


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key)


# An image-text checkpoint's text model, under the names of transformers 5 (model.language_model.*) or of
# earlier releases (language_model.model.*), and the parts of it a text-only server does not load.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
VISION_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
                   "visual.", "model.visual.")  # the last two: Qwen3.5's vision encoder and merger
# Tensors of heads that serving does not run: Qwen3-Next's and Qwen3.5's multi-token prediction head,
# published with the model (transformers skips it on load too).
UNUSED_PREFIXES = ("mtp.",)


def text_model_name(name: str, multimodal: bool) -> str | None:
    """The text model's name for a checkpoint tensor (None: part of an image-text model's vision
    tower or projector). Names of text-only checkpoints are returned as they are."""
    if not multimodal:
        return name
    for prefix, ours in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return None if name.startswith(VISION_PREFIXES) else name


def load_weights(
    model: CausalLM,
    named: Iterator[tuple[str, torch.Tensor | NF4Weight]],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Fill a model built on the meta device. Dense tensors are moved in (fused projections get
    their slices copied into one tensor); NF4 weights are adopted as they are, never expanded."""
    loaded: set[tuple[str, int | None]] = set()
    densified: list[str] = []
    vision: list[str] = []
    for disk_name, value in named:
        if disk_name.startswith(UNUSED_PREFIXES):
            continue
        hf_name = text_model_name(disk_name, model.config.multimodal)
        if hf_name is None:
            if not _load_vision(model, disk_name, value, dtype, device, loaded, densified):
                vision.append(disk_name)
            continue
        if hf_name == "lm_head.weight" and model.lm_head is None:
            continue  # tied: the embedding serves as lm_head
        if "rotary_emb" in hf_name:
            continue
        hf_name = moe_checkpoint_name(hf_name)
        if load_expert_weight(model, hf_name, value, dtype, device):
            continue
        name, index = fused_target(hf_name)
        module_name, _, pname = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if module is None or pname not in module._parameters:
            raise ValueError(f"checkpoint has {hf_name!r}, which this {model.config.family} model lacks")
        if not isinstance(value, torch.Tensor) and not _adopt_in_4bit(module, pname, value):
            value = _dense_from_4bit(hf_name, value, densified)
        # A fused projection stored whole (Phi-3's qkv_proj, gate_up_proj) fills every slice at once.
        slices = module.out_slices if isinstance(module, LoRALinear) else [0]
        whole = index is None and len(slices) > 1
        if not isinstance(value, torch.Tensor):  # an NF4Weight: adopted in 4-bit
            assert isinstance(module, LoRALinear)
            value = value if value.device == device else value.to(device)
            if whole:
                module.set_fused_quantized(value)
            else:
                module.set_quantized(index or 0, value)
        else:
            _load_dense(module, pname, index, value, dtype, device, hf_name)
        loaded.update([(name, i) for i in range(len(slices))] if whole else [(name, index)])
    if vision:
        logger.warning("%d tensors of the vision tower and projector (%s ...) are not loaded: the text model of "
                       "this image-text checkpoint is served, for text prompts only", len(vision), vision[0])
    missing = [f"{n}[{i}]" if i is not None else n for n, i in _expected(model) - loaded]
    missing += settle_experts(model, dtype, device)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
    mixed = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.settle()]
    if mixed:
        logger.info("%d fused projections mix 4-bit and 16-bit parts (a dynamic 4-bit checkpoint): served in "
                    "16-bit, their 4-bit parts dequantized to bitsandbytes' values (faster than part by part on "
                    "the H200): %s%s", len(mixed), ", ".join(mixed[:4]), " ..." if len(mixed) > 4 else "")
    if densified:
        logger.info("%d 4-bit weights are served dequantized to 16-bit (exactly bitsandbytes' values): %s%s",
                    len(densified), ", ".join(densified[:4]), " ..." if len(densified) > 4 else "")


def _load_vision(model: CausalLM, disk_name: str, value: torch.Tensor | NF4Weight, dtype: torch.dtype,
                 device: torch.device, loaded: set[tuple[str, int | None]], densified: list[str]) -> bool:
    """A tensor of an image-text model's vision tower or projector into ours (16-bit: a 4-bit one is
    dequantized); False when the model serves text only."""
    name = vision_module_name(disk_name) if isinstance(model, NATIVE_VISION) else None
    if name is None:
        return False
    if not isinstance(value, torch.Tensor):
        value = _dense_from_4bit(name, value, densified)
    module_name, _, pname = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or pname not in module._parameters:
        raise ValueError(f"checkpoint has {disk_name!r}, which this model's vision tower and projector lack")
    _load_dense(module, pname, None, value, dtype, device, disk_name)
    loaded.add((name, None))
    return True


def _adopt_in_4bit(module: torch.nn.Module, pname: str, w: NF4Weight) -> bool:
    """Whether a 4-bit weight is kept packed: a linear projection's weight in the NF4 code book (what
    our kernels decode). Anything else (a 4-bit lm_head, FP4 codes) is dequantized at load."""
    from sloth_kernels.nf4_format import is_nf4_code

    return isinstance(module, LoRALinear) and pname == "weight" and is_nf4_code(w.code)


def _dense_from_4bit(hf_name: str, w: NF4Weight, densified: list[str]) -> torch.Tensor:
    from sloth_kernels.nf4 import dequantize_nf4_ref

    densified.append(hf_name)
    return dequantize_nf4_ref(w)


def _load_dense(
    module: torch.nn.Module, pname: str, index: int | None, value: torch.Tensor,
    dtype: torch.dtype, device: torch.device, hf_name: str,
) -> None:
    if not value.is_floating_point():
        # An 8-bit bitsandbytes weight (int8 plus a scale per row, multiplied with outlier columns
        # in 16-bit at run time) or another integer format: cast as is it would be garbage.
        raise ValueError(f"{hf_name} is stored as {value.dtype}, not a floating-point or 4-bit weight (an 8-bit "
                         f"or other integer-quantized checkpoint?): serve the 16-bit or the bitsandbytes 4-bit "
                         f"version of the model instead")
    param = module._parameters[pname]
    assert param is not None
    if pname in getattr(module, "fp32_params", ()):  # a router's bias: 16-bit would change its picks
        dtype = torch.float32
    if index is None:
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"{hf_name}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}")
        module._parameters[pname] = torch.nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
        return
    assert isinstance(module, LoRALinear)
    if param.is_meta:
        param = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
        module._parameters[pname] = param
    sizes = module.out_slices
    start = sum(sizes[:index])
    target = param.data[start : start + sizes[index]]
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"{hf_name}: checkpoint shape {tuple(value.shape)} != model {tuple(target.shape)}")
    target.copy_(value)


def _expected(model: CausalLM) -> set[tuple[str, int | None]]:
    expected: set[tuple[str, int | None]] = set()
    for module_name, module in model.named_modules():
        for pname, param in module._parameters.items():
            if param is None or isinstance(module, Experts):  # Experts count their own (settle_experts)
                continue
            name = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, LoRALinear) and len(module.out_slices) > 1:
                expected.update((name, i) for i in range(len(module.out_slices)))
            else:
                expected.add((name, None))
    return expected


def build_model(cfg: ModelConfig, named: Iterator[tuple[str, torch.Tensor | NF4Weight]],
                dtype: torch.dtype, device: torch.device) -> CausalLM:
    model: CausalLM
    with torch.device("meta"):
        if cfg.family in GEMMA_FAMILIES:
            model = GemmaVisionForCausalLM(cfg) if cfg.vision_config is not None else GemmaForCausalLM(cfg)
        elif cfg.family == "gpt_oss":
            model = GptOssForCausalLM(cfg)
        elif cfg.family == "glm4":
            model = Glm4ForCausalLM(cfg)
        elif cfg.family == "exaone4":
            model = Exaone4ForCausalLM(cfg)
        elif cfg.family in ("cohere", "stablelm"):
            model = LayerNormForCausalLM(cfg)
        elif cfg.family in ("lfm2", "lfm2_moe"):
            model = Lfm2ForCausalLM(cfg)
        elif cfg.family in ("qwen3_5", "qwen3_5_moe"):
            model = Qwen3_5VisionForCausalLM(cfg) if cfg.vision_config is not None else Qwen3_5ForCausalLM(cfg)
        elif cfg.family == "granitemoehybrid":
            model = GraniteMoeHybridForCausalLM(cfg)
        elif cfg.family == "falcon_h1":
            model = FalconH1ForCausalLM(cfg)
        elif cfg.vision_config is not None:
            model = Mistral3VisionForCausalLM(cfg)
        else:
            model = LlamaForCausalLM(cfg)
    load_weights(model, named, dtype, device)
    # Buffers built on the meta device hold nothing: recompute the rotary tables (kept in float32).
    if isinstance(model, GemmaForCausalLM):
        for prefix, (cos, sin) in gemma_rope_tables(cfg).items():
            setattr(model, f"{prefix}rope_cos", cos.to(device))
            setattr(model, f"{prefix}rope_sin", sin.to(device))
        model.post_load()
        return model
    cos, sin = rope_tables(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    if isinstance(model, (GptOssForCausalLM, Mistral3VisionForCausalLM, Qwen3_5VisionForCausalLM)):
        model.post_load()
    return model
