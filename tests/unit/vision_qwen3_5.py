"""Tiny random Qwen3.5 image-text folders (Qwen3_5ForConditionalGeneration, or the MoE one) for the
vision tests: a 4-layer hybrid text model (Gated DeltaNet, full attention, DeltaNet, DeltaNet; hidden
64) and a 2-block vision encoder (4-pixel patches, 2x2 merge), with the tokenizer, template and image
processor of tests/unit/vision_models.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoTokenizer
from vision_models import TEMPLATE, VISION_TOKENS, image_processor

from sloth_serve.loader import DEMO_MODEL


def make_qwen3_5_vl(folder: Path, moe: bool = False) -> tuple[Path, Any]:
    """The folder (weights, tokenizer, template, image processor) and transformers' model (eager)."""
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = TEMPLATE
    start, pad, end = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    rope = {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 2, 1],
            "mrope_interleaved": True}
    text: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=20, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=8, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        max_position_embeddings=512, eos_token_id=2, pad_token_id=0, bos_token_id=1, initializer_range=0.3,
        rope_parameters=rope)
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16, initializer_range=0.3)
    config_class: Any = transformers.Qwen3_5Config
    model_class: Any = transformers.Qwen3_5ForConditionalGeneration
    if moe:
        text = {k: v for k, v in text.items() if k != "intermediate_size"}
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
        config_class, model_class = transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=pad, vision_start_token_id=start,
                          vision_end_token_id=end, video_token_id=len(tokenizer) + 7, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random biases, norms, gates and decays so that those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "dt_bias" in name or "A_log" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif "mlp.gate.weight" in name or "experts" in name:
                p.normal_(0.0, 0.3)  # transformers initializes the router and experts small / empty
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(folder)
    return folder, model
