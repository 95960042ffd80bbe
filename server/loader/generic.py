"""Load a model of a family we have no model code for onto the generic path: transformers builds it
(through Unsloth's FastLanguageModel, or AutoModelForCausalLM for 16-bit safetensors), every tensor
on disk must have reached it, its linears become ours and its attention is routed to the paged KV
cache (sloth_serve.models.generic); the log says once that this path is used and what it costs."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from transformers import PreTrainedModel

from ..models.config import ModelConfig
from ..models.families import TEXT_ONLY_ARCHITECTURES, TextOnly, UnsupportedModel
from ..models.generic import ATTN_IMPLEMENTATION, GenericCausalLM
from ..models.generic_linear import GenericLinear, adopt_linear, is_linear, lora_targets
from ..models.generic_step import GenericStep
from ..models.vision_attention import use_varlen_attention
from .folders import read_json_object
from .unsloth import _RECOMPUTED, disk_tensor_names

logger = logging.getLogger(__name__)


def load_generic(folder: Path, dtype: torch.dtype, device: torch.device, load_format: str,
                 max_seq_length: int, vision: bool = False) -> GenericCausalLM:
    """`vision`: an image-text model (sloth_serve.models.vision): its language model is served as above,
    its vision encoder keeps transformers' attention and 16-bit linears (4-bit ones become ours)."""
    start = time.perf_counter()
    if load_format == "unsloth" and vision and device.type != "cuda":
        raise ValueError("Unsloth loads image-text models (FastVisionModel) on CUDA only; on the CPU serve the "
                         "16-bit folder with --load-format safetensors")
    text_only = text_only_of(folder)
    if load_format == "unsloth":
        from .unsloth import load_hf_with_unsloth  # imports Unsloth: only on this path

        # A text-only image-text model is read whole, as Unsloth's notebooks load it, then cut to its text model.
        hf = cast(PreTrainedModel, load_hf_with_unsloth(folder, max_seq_length, vision or text_only is not None))
        check_every_tensor_loaded(folder, hf)
        left = 0
        if text_only is not None:
            hf, left = text_causal_lm(hf), len(tower_tensors(folder, text_only))
    else:
        hf = load_hf_16bit(folder, dtype, device, vision, text_only)
        left = check_every_tensor_loaded(folder, hf, text_only)
    if left:
        logger.info("%s: its text model is served; %d tensors of its other towers stay on disk", folder, left)
    # The language model's attention goes to the paged KV cache; a vision encoder's stays as it is.
    text = getattr(hf, hf.base_model_prefix).language_model if vision else hf
    route_attention(text)
    if vision:  # the Qwen-VL encoders' windows: a few batched calls a layer instead of one per window
        use_varlen_attention(hf)
    step = GenericStep()
    inside = f"{hf.base_model_prefix}.language_model." if vision else f"{hf.base_model_prefix}."
    linears = adopt_linears(hf, step, dtype, device, inside)
    for param in hf.parameters():  # the rest (embeddings, norms) in the engine's dtype, on its device
        if param.is_floating_point():
            param.data = param.data.to(device=device, dtype=dtype)
    for buf_name, buf in list(hf.named_buffers()):
        if buf.device != device:  # rotary tables and the like keep their own dtype (float32)
            owner, _, leaf = buf_name.rpartition(".")
            hf.get_submodule(owner)._buffers[leaf] = buf.to(device)
    hf.eval()
    # adapters' projections live in the backbone (not lm_head; nor, here, a vision encoder)
    targets = lora_targets({name: m for name, m in linears.items() if name.startswith(inside)})
    vocab = int(hf.get_output_embeddings().weight.shape[0])
    if vision and type(hf).__name__ == "MllamaForConditionalGeneration":
        from ..models.mllama import MllamaCausalLM

        model: GenericCausalLM = MllamaCausalLM(hf, step, targets)
    elif vision:
        from ..models.vision import VisionCausalLM

        model = VisionCausalLM(hf, step, targets)
    else:
        model = GenericCausalLM(hf, step, targets)
    cfg = model.config = generic_config(model.head.config, vocab, model.kv_layout(device))
    model.check_routing(dtype, device)
    num_4bit = sum(1 for m in linears.values() if m.is_quantized)
    graphs = ("CUDA graphs for decode steps only (prompt steps run eagerly)" if model.supports_cuda_graphs
              else "no CUDA graphs (every step runs eagerly, as --enforce-eager)")
    logger.warning(
        "%s has no native model code in sloth-serve: served on the generic path (transformers %s modules inside "
        "our engine: paged KV cache, continuous batching, %d linears on our kernels, %d kept in 4-bit, multi-LoRA). "
        "It costs speed: %s and transformers' Python modules around our kernels; loaded in %.1fs", cfg.family,
        type(hf).__name__, len(linears), num_4bit, graphs, time.perf_counter() - start)
    return model


def text_only_of(folder: Path) -> TextOnly | None:
    """How the folder's multimodal architecture is served as text alone (None: it is not such a model)."""
    archs = read_json_object(folder / "config.json").get("architectures") or []
    return TEXT_ONLY_ARCHITECTURES.get(str(archs[0])) if isinstance(archs, list) and archs else None


def load_hf_16bit(folder: Path, dtype: torch.dtype, device: torch.device, vision: bool = False,
                  text_only: TextOnly | None = None) -> PreTrainedModel:
    """`text_only`: the causal LM of the folder's text config, reading the text model's tensors alone
    (renamed from their checkpoint prefix to the causal LM's); the other towers are never built."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    extra: dict[str, object] = {}
    if text_only is None:
        return auto.from_pretrained(str(folder), dtype=dtype, device_map={"": device},  # type: ignore[no-any-return]
                                    local_files_only=True)
    extra["config"] = AutoConfig.from_pretrained(str(folder), local_files_only=True).get_text_config()
    extra["key_mapping"] = {f"^{re.escape(text_only.text_prefix)}": "model."}
    # transformers' load report would list every tensor of the towers as unexpected (hundreds of lines);
    # check_every_tensor_loaded makes the checks that matter and logs what stays on disk in one line.
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        return auto.from_pretrained(str(folder), dtype=dtype, device_map={"": device},  # type: ignore[no-any-return]
                                    local_files_only=True, **extra)
    finally:
        report.setLevel(level)


def text_causal_lm(hf: PreTrainedModel) -> PreTrainedModel:
    """The causal LM of a loaded image-text model's text model and head; its other towers are let go."""
    from transformers import AutoModelForCausalLM

    text_model = hf.get_submodule(f"{hf.base_model_prefix}.language_model")
    with torch.device("meta"):  # both of its modules are replaced by the loaded model's
        lm = AutoModelForCausalLM.from_config(text_model.config)
    setattr(lm, lm.base_model_prefix, text_model)
    lm.lm_head = hf.get_output_embeddings()
    lm.config = text_model.config  # one config: the attention implementation set on it reaches every layer
    return cast(PreTrainedModel, lm)


def tower_tensors(folder: Path, text_only: TextOnly) -> list[str]:
    """The checkpoint's tensors of the towers a text-only load leaves on disk."""
    return [k for k in disk_tensor_names(folder) if k.startswith(text_only.other_towers)]


def check_every_tensor_loaded(folder: Path, hf: PreTrainedModel, text_only: TextOnly | None = None) -> int:
    """Every tensor on disk is one of the model's, and every parameter of the model came from disk:
    transformers drops unexpected keys and initializes missing ones at random, with a warning at most.
    With `text_only`, the text model's tensors are read under their checkpoint prefix and those of the
    other towers stay on disk: how many did."""
    state = set(hf.state_dict().keys()) | {n for n, _ in hf.named_parameters(remove_duplicate=False)} | {
        n for n, _ in hf.named_buffers(remove_duplicate=False)}
    disk = disk_tensor_names(folder)
    rename = _checkpoint_renamer(hf, state)
    left = set(tower_tensors(folder, text_only)) if text_only is not None else set()
    if text_only is not None:
        prefix = text_only.text_prefix
        loaded = {k: rename("model." + k[len(prefix):] if k.startswith(prefix) else k) for k in disk if k not in left}
    else:
        loaded = {k: rename(k) for k in disk}
    unread = sorted(k for k, name in loaded.items() if name not in state and not k.endswith(_RECOMPUTED))
    if unread:
        raise ValueError(f"{folder / disk[unread[0]]}: {len(unread)} tensor(s) on disk were not loaded by "
                         f"{type(hf).__name__} (first: {unread[0]!r}); sloth-serve does not serve a model with weights "
                         f"left out. Check that config.json's architectures matches the checkpoint")
    on_disk = set(loaded.values())
    by_tensor: dict[int, list[str]] = {}
    for name, param in hf.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    missing = sorted(names[0] for names in by_tensor.values() if not any(n in on_disk for n in names))
    if missing:
        raise ValueError(f"{folder}: {len(missing)} weight(s) of {type(hf).__name__} are not on disk (first: "
                         f"{missing[0]!r}) and would be random; is the checkpoint complete?")
    return len(left)


def _checkpoint_renamer(hf: PreTrainedModel, state: set[str]) -> Callable[[str], str]:
    """A checkpoint key -> the model's name for it, as transformers renamed it at load (its conversion
    mapping: legacy names, fused experts; and the base model prefix added or dropped)."""
    prefix = str(getattr(hf, "base_model_prefix", ""))
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(hf)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except (ImportError, AttributeError, TypeError):  # another transformers release: names as they are
        renamings, converters = [], []
    lookup = dict.fromkeys(state, True)

    def rename(key: str) -> str:
        if renamings or converters:
            key = rename_source_key(key, renamings, converters, prefix, lookup)[0]
        if key not in state and f"{prefix}.{key}" in state:
            key = f"{prefix}.{key}"
        return key

    return rename


def route_attention(hf: PreTrainedModel) -> None:
    """Point every attention layer at our paged attention (transformers' AttentionInterface)."""
    can_set = getattr(type(hf), "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise UnsupportedModel(f"{type(hf).__name__} does not take an attention implementation through "
                               "AttentionInterface, so it cannot use sloth-serve's paged KV cache")
    hf.set_attn_implementation(ATTN_IMPLEMENTATION)
    if hf.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise UnsupportedModel(f"{type(hf).__name__} kept attention implementation "
                               f"{hf.config._attn_implementation!r}; it cannot use sloth-serve's paged KV cache")


def adopt_linears(hf: PreTrainedModel, step: GenericStep, dtype: torch.dtype, device: torch.device,
                  inside: str) -> dict[str, GenericLinear]:
    """Replace the linears under `inside` (4-bit or 16-bit) and every 4-bit one by ours, in place;
    ours by module name."""
    ours: dict[str, GenericLinear] = {}
    for name, module in list(hf.named_modules()):
        if not name or not is_linear(module):
            continue
        if not name.startswith(inside) and getattr(module.weight, "quant_state", None) is None:
            continue  # a 16-bit lm_head stays: no adapter reaches it, and a tied one shares the embedding
        parent, _, leaf = name.rpartition(".")
        layer = adopt_linear(module, step, dtype, device)
        setattr(hf.get_submodule(parent) if parent else hf, leaf, layer)
        ours[name] = layer
    return ours


def generic_config(config: object, vocab: int, kv_shapes: list[tuple[int, int]]) -> ModelConfig:
    """The facts our engine needs from the transformers config; the KV cache's shapes as measured
    (each cache-holding layer's KV heads and head dim)."""
    num_layers = len(kv_shapes)
    num_kv_heads, head_dim = kv_shapes[0]
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = int(getattr(c, "num_attention_heads", num_kv_heads))
    # What the warmup compiles attention kernels for (the model passes each layer's own at run time).
    window = getattr(c, "sliding_window", None)
    window = window if isinstance(window, int) else None
    types = getattr(c, "layer_types", None)
    # The layers holding a cache come first (KV-shared ones, which read theirs, last): their windows.
    layer_windows = (tuple(window if t == "sliding_attention" else None for t in types[:num_layers])
                     if window and types else None)
    softcap = getattr(c, "attn_logit_softcapping", None)
    intermediate = getattr(c, "intermediate_size", 0) or 0
    intermediate = max(intermediate) if isinstance(intermediate, (list, tuple)) else intermediate  # per layer (Gemma 3n)
    return ModelConfig(
        family=str(getattr(c, "model_type", "unknown")), vocab_size=vocab, hidden_size=int(getattr(c, "hidden_size", 0)),
        intermediate_size=int(intermediate), num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6) or 1e-6), rope_theta=0.0,
        rope_scaling=None,  # the model applies its own RoPE: positions reach it as they are
        max_position_embeddings=int(getattr(c, "max_position_embeddings", None) or 2048),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        sliding_window=window, layer_windows=layer_windows,
        attn_softcap=float(softcap) if isinstance(softcap, (int, float)) else None,
        kv_shapes=tuple(kv_shapes) if len(set(kv_shapes)) > 1 else None,
    )
