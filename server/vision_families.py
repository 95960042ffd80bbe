"""Which image processor an image-text model's folder gets: config.json's architecture picks its
family's (Gemma 3: server/vision_gemma3.py; Mistral 3: server/vision_mistral3.py; Llama 3.2 Vision:
server/vision_mllama.py; the Qwen-VL families and Qwen3.5: server/vision_processor.py, the base the others build on). The one place that knows every
family, so the base needs none of them."""

from __future__ import annotations

import json
from pathlib import Path

from .models.families import VISION_ARCHITECTURES
from .models.qwen3_5_config import qwen3_5_vision_on_disk
from .vision_gemma3 import Gemma3VisionProcessor
from .vision_mistral3 import Mistral3VisionProcessor
from .vision_mllama import MllamaVisionProcessor
from .vision_processor import ImageLimits, VisionProcessor

GEMMA3_VISION = "Gemma3ForConditionalGeneration"  # served natively, with its vision tower (server/vision_gemma3.py)
MLLAMA_VISION = "MllamaForConditionalGeneration"  # images through cross-attention (server/vision_mllama.py)
# served natively, with their Pixtral tower (server/vision_mistral3.py)
PIXTRAL_VISION = ("Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration")
# served natively, with their vision encoder (server/models/qwen3_5_vision.py); Qwen-VL's image processor
QWEN3_5_VISION = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


def processor_for(folder: str | Path, limits: ImageLimits | None = None) -> VisionProcessor | None:
    """The processor of an image-text model's folder; None for a text-only model."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    limits = limits or ImageLimits()
    if arch == GEMMA3_VISION and isinstance(cfg.get("vision_config"), dict):
        return Gemma3VisionProcessor.from_gemma_folder(folder, cfg, limits)
    if arch in PIXTRAL_VISION and isinstance(cfg.get("vision_config"), dict):
        return Mistral3VisionProcessor.from_mistral3_folder(folder, cfg, limits)
    if arch == MLLAMA_VISION:
        return MllamaVisionProcessor.from_mllama_folder(folder, cfg, limits)
    # Qwen3.5's folder without its vision encoder's weights serves its text model (ModelConfig.from_folder warns)
    if arch in VISION_ARCHITECTURES or (arch in QWEN3_5_VISION and isinstance(cfg.get("vision_config"), dict)
                                        and qwen3_5_vision_on_disk(folder)):
        return VisionProcessor.from_qwen_folder(folder, cfg, limits)
    return None
