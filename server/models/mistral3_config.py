"""Reads the config.json of a Mistral model with a Pixtral vision tower: Mistral3ForConditionalGeneration
(Mistral Small 3.1 / 3.2, Ministral 3 and their fine-tunes) or a LlavaForConditionalGeneration whose tower
is Pixtral's (Pixtral-12B: no patch merge, a plain two-linear projector). The text model is a Mistral,
Ministral 3 (Mistral with YaRN and a query scale growing with the position) or Llama decoder served by
our Llama path; the tower and projector are described by the fields returned here, with transformers'
Mistral3Config / LlavaConfig defaults for what config.json leaves out."""

from __future__ import annotations

from typing import Any

MISTRAL3_ARCHITECTURE = "Mistral3ForConditionalGeneration"
LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"  # served with a Pixtral tower only
PIXTRAL_ARCHITECTURES = (MISTRAL3_ARCHITECTURE, LLAVA_ARCHITECTURE)
# text_config model types whose decoder our Llama path computes exactly as transformers does
TEXT_ARCHITECTURES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM", "ministral3": "Ministral3ForCausalLM"}


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def _arch(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or [MISTRAL3_ARCHITECTURE]
    return str(archs[0] if isinstance(archs, list) else archs)


def text_refusal(cfg: dict[str, Any]) -> str | None:
    """Why a Mistral3 / LLaVA checkpoint is not served natively (None: it is)."""
    arch = _arch(cfg)
    vision = cfg.get("vision_config")
    if arch == LLAVA_ARCHITECTURE:
        tower = vision.get("model_type") if isinstance(vision, dict) else None
        if tower != "pixtral":
            what = f"a {tower!r} vision tower" if tower else "no Pixtral vision_config"
            return (f"a multimodal model (LLaVA) with {what}; sloth-serve serves {arch} with a Pixtral tower "
                    "(Pixtral-12B) only")
        strategy = cfg.get("vision_feature_select_strategy", "default")
        if strategy != "full":
            return (f"its vision_feature_select_strategy {strategy!r} drops the first patch of the Pixtral tower's "
                    "output; Pixtral checkpoints use 'full'")
    text = cfg.get("text_config")
    model_type = str(text.get("model_type", "mistral")) if isinstance(text, dict) else None
    if model_type is None or model_type in TEXT_ARCHITECTURES:
        return None  # a missing text_config is reported by mistral3_text_config
    return (f"its text model is a {model_type!r} decoder; sloth-serve serves {arch} with a "
            f"{' or '.join(repr(t) for t in TEXT_ARCHITECTURES)} text model")


def mistral3_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config.json as a text-only checkpoint's (architectures naming its class),
    with the checkpoint-level fields that decide its head (tied embeddings) and dtype."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise _fail("text_config", f"{_arch(cfg)} needs the text model's config as an object, got {text!r:.80}")
    reason = text_refusal(cfg)
    if reason is not None:
        raise _fail("text_config.model_type", reason)
    arch = TEXT_ARCHITECTURES[str(text.get("model_type", "mistral"))]
    top = {k: cfg[k] for k in ("tie_word_embeddings", "torch_dtype", "dtype") if k in cfg}
    return {**text, **top, "architectures": [arch]}


def mistral3_vision_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's vision fields: the Pixtral tower's config, the [IMG] token, and the projector's
    settings (its architecture's, the spatial merge (1: none), activation, bias, which tower layers it
    reads)."""
    vision = cfg.get("vision_config")
    if not isinstance(vision, dict):
        raise _fail("vision_config", f"expected the Pixtral vision tower's config as an object, got {vision!r:.80}")
    if vision.get("model_type", "pixtral") != "pixtral":
        raise _fail("vision_config.model_type", f"{vision.get('model_type')!r}: {_arch(cfg)} is served "
                    "with its Pixtral vision tower only")
    llava = _arch(cfg) == LLAVA_ARCHITECTURE
    merge = 1 if llava else int(cfg.get("spatial_merge_size", 2))
    if merge < 1:
        raise _fail("spatial_merge_size", f"expected a positive integer, got {merge}")
    layer = cfg.get("vision_feature_layer", -1)
    if not isinstance(layer, int) and not (isinstance(layer, list) and layer and all(isinstance(i, int) for i in layer)):
        raise _fail("vision_feature_layer", f"expected a layer index or a list of them, got {layer!r:.80}")
    projector = dict(architecture=_arch(cfg), spatial_merge_size=merge,
                     projector_hidden_act=str(cfg.get("projector_hidden_act", "gelu")),
                     multimodal_projector_bias=bool(cfg.get("multimodal_projector_bias", llava)),
                     vision_feature_layer=layer)
    image_token = cfg.get("image_token_id", cfg.get("image_token_index", 32000 if llava else 10))
    return dict(vision_config=dict(vision), image_token_id=int(image_token), vision_projector=projector)
