"""Reads a Mistral3ForConditionalGeneration config.json (Mistral Small 3.1 / 3.2 and their fine-tunes):
its text model is a Mistral (or Llama) decoder served by our Llama path, its Pixtral vision tower and
multi-modal projector are described by the fields returned here, with transformers' Mistral3Config
defaults for what config.json leaves out."""

from __future__ import annotations

from typing import Any

MISTRAL3_ARCHITECTURE = "Mistral3ForConditionalGeneration"
# text_config model types whose decoder our Llama path computes exactly as transformers does
TEXT_ARCHITECTURES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def text_refusal(cfg: dict[str, Any]) -> str | None:
    """Why the text model of a Mistral3 checkpoint is not served (None: it is)."""
    text = cfg.get("text_config")
    model_type = str(text.get("model_type", "mistral")) if isinstance(text, dict) else None
    if model_type is None or model_type in TEXT_ARCHITECTURES:
        return None  # a missing text_config is reported by mistral3_text_config
    return (f"its text model is a {model_type!r} decoder; sloth-serve serves {MISTRAL3_ARCHITECTURE} with a "
            f"{' or '.join(repr(t) for t in TEXT_ARCHITECTURES)} text model")


def mistral3_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config.json as a text-only checkpoint's (architectures naming its class),
    with the checkpoint-level fields that decide its head (tied embeddings) and dtype."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise _fail("text_config", f"{MISTRAL3_ARCHITECTURE} needs the text model's config as an object, got "
                    f"{text!r:.80}")
    reason = text_refusal(cfg)
    if reason is not None:
        raise _fail("text_config.model_type", reason)
    arch = TEXT_ARCHITECTURES[str(text.get("model_type", "mistral"))]
    top = {k: cfg[k] for k in ("tie_word_embeddings", "torch_dtype", "dtype") if k in cfg}
    return {**text, **top, "architectures": [arch]}


def mistral3_vision_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's vision fields: the Pixtral tower's config, the [IMG] token, and the projector's
    settings (spatial merge, activation, bias, which tower layers it reads)."""
    vision = cfg.get("vision_config")
    if not isinstance(vision, dict):
        raise _fail("vision_config", f"expected the Pixtral vision tower's config as an object, got {vision!r:.80}")
    if vision.get("model_type", "pixtral") != "pixtral":
        raise _fail("vision_config.model_type", f"{vision.get('model_type')!r}: {MISTRAL3_ARCHITECTURE} is served "
                    "with its Pixtral vision tower only")
    merge = int(cfg.get("spatial_merge_size", 2))
    if merge < 1:
        raise _fail("spatial_merge_size", f"expected a positive integer, got {merge}")
    layer = cfg.get("vision_feature_layer", -1)
    if not isinstance(layer, int) and not (isinstance(layer, list) and layer and all(isinstance(i, int) for i in layer)):
        raise _fail("vision_feature_layer", f"expected a layer index or a list of them, got {layer!r:.80}")
    projector = dict(spatial_merge_size=merge, projector_hidden_act=str(cfg.get("projector_hidden_act", "gelu")),
                     multimodal_projector_bias=bool(cfg.get("multimodal_projector_bias", False)),
                     vision_feature_layer=layer)
    image_token = cfg.get("image_token_id", cfg.get("image_token_index", 10))
    return dict(vision_config=dict(vision), image_token_id=int(image_token), vision_projector=projector)
