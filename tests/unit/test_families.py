"""Which path serves a config.json (native / generic / refused), decided from the JSON and
transformers' source files alone: refusals are one line naming the reason, made before any weight
is read, at start-up (preflight) and in the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sloth_serve.models.families import UnsupportedModel, route_of
from sloth_serve.preflight import StartupError, check_model


def cfg(arch: str, model_type: str, **extra: object) -> dict:
    return {"architectures": [arch], "model_type": model_type, **extra}


@pytest.mark.parametrize("arch, model_type, path", [
    ("LlamaForCausalLM", "llama", "native"),
    ("LlamaForCausalLM", "exaone", "native"),  # the architecture decides, not the model type
    ("GptOssForCausalLM", "gpt_oss", "native"),  # attention sinks: our kernels, not the generic path's
    ("Lfm2ForCausalLM", "lfm2", "native"),  # recurrent (short convolutions), with a state slot per sequence
    ("Lfm2MoeForCausalLM", "lfm2_moe", "native"),  # the same with experts
    ("Qwen3_5ForCausalLM", "qwen3_5_text", "native"),  # Gated DeltaNet, with a state slot per sequence
    ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", "native"),
    ("GraniteMoeHybridForCausalLM", "granitemoehybrid", "native"),  # Mamba-2 + attention
    ("FalconH1ForCausalLM", "falcon_h1", "native"),
    ("CohereForCausalLM", "cohere", "native"),  # LayerNorm families (server/models/layernorm.py)
    ("StableLmForCausalLM", "stablelm", "native"),
    ("GlmForCausalLM", "glm", "native"),
    ("Glm4ForCausalLM", "glm4", "native"),
    ("GraniteForCausalLM", "granite", "generic"),
    ("Olmo2ForCausalLM", "olmo2", "generic"),
    ("SmolLM3ForCausalLM", "smollm3", "native"),
    ("Exaone4ForCausalLM", "exaone4", "native"),
    ("Ministral3ForCausalLM", "ministral3", "native"),  # our Llama path with its query scale
    ("GPT2LMHeadModel", "gpt2", "generic"),
    ("Gemma4ForCausalLM", "gemma4_text", "generic"),  # its modeling file is under models/gemma4
    ("Gemma4ForConditionalGeneration", "gemma4", "generic"),  # its text model alone
    ("Gemma3nForCausalLM", "gemma3n_text", "generic"),  # its modeling file is under models/gemma3n
    ("Gemma3nForConditionalGeneration", "gemma3n", "generic"),  # its text model alone
    ("DeepseekV3ForCausalLM", "deepseek_v3", "generic"),  # latent attention, expanded per head by the model
    ("AriaTextForCausalLM", "aria_text", "generic"),  # its code lives in transformers' aria folder
])
def test_route(arch: str, model_type: str, path: str) -> None:
    assert route_of(cfg(arch, model_type)).path == path


@pytest.mark.parametrize("arch, model_type, key", [("CohereForCausalLM", "cohere", "use_qk_norm"),
                                                   ("StableLmForCausalLM", "stablelm", "qk_layernorm")])
def test_q_k_layernorms_take_the_generic_path(arch: str, model_type: str, key: str) -> None:
    """What the native LayerNorm families do not build sends the model to the generic path."""
    assert route_of(cfg(arch, model_type, **{key: True})).path == "generic"
    assert route_of(cfg(arch, model_type, **{key: False})).path == "native"


@pytest.mark.parametrize("config, reason", [
    (cfg("Qwen3NextForCausalLM", "qwen3_next"), "recurrent or linear-attention state"),
    (cfg("MambaForCausalLM", "mamba"), "recurrent or linear-attention state"),
    (cfg("JambaForCausalLM", "jamba"), "recurrent or linear-attention state"),
    (cfg("BambaForCausalLM", "bamba"), "recurrent or linear-attention state"),
    (cfg("SomeNewForCausalLM", "somenew", layer_types=["full_attention", "linear_attention"]),
     "linear_attention layers"),
    (cfg("T5ForConditionalGeneration", "t5", is_encoder_decoder=True), "encoder-decoder"),
    (cfg("BertForMaskedLM", "bert"), "not a causal language model"),
    (cfg("LlavaForConditionalGeneration", "llava"), "a multimodal model"),
    (cfg("BloomForCausalLM", "bloom"), "ALiBi"),
    (cfg("FalconForCausalLM", "falcon", alibi=True), "ALiBi"),
    (cfg("Llama4ForCausalLM", "llama4_text", attention_chunk_size=8192), "chunked local attention"),
    (cfg("HrmTextForCausalLM", "hrm_text", H_cycles=2, L_cycles=3, prefix_lm=True), "recurrent cycles"),
    (cfg("BltForCausalLM", "blt", patcher_config={}, encoder_config={}, decoder_config={}), "local encoder"),
    (cfg("GraniteForCausalLM", "granite", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic RoPE"),
    (cfg("FalconForCausalLM", "falcon"), "computes attention itself"),
    (cfg("MyModelForCausalLM", "my_model", auto_map={"AutoModelForCausalLM": "x.MyModel"}), "trust_remote_code"),
    (cfg("GraniteForCausalLM", "llama"), "has no GraniteForCausalLM for model_type 'llama'"),
    (cfg("Gemma4ForCausalLM", "gemma4_text", use_bidirectional_attention="all"), "attend both ways"),
    (cfg("Gemma4ForConditionalGeneration", "gemma4", text_config={"use_bidirectional_attention": "all"}),
     "attend both ways"),  # the text model's config decides
])
def test_refusal_names_the_reason(config: dict, reason: str) -> None:
    with pytest.raises(UnsupportedModel) as info:
        route_of(config)
    assert reason in str(info.value) and "\n" not in str(info.value)


def hybrid_folder(tmp_path: Path) -> Path:
    """A Qwen3-Next config beside a weights file that cannot be read: a refusal must come first."""
    folder = tmp_path / "qwen3-next"
    folder.mkdir()
    config = cfg("Qwen3NextForCausalLM", "qwen3_next", vocab_size=4096, hidden_size=64, num_hidden_layers=4,
                 num_attention_heads=4, layer_types=["linear_attention", "linear_attention", "linear_attention",
                                                     "full_attention"])
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_ministral3_needs_its_query_scale_parameters() -> None:
    from sloth_serve.models.config import ModelConfig

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "llama_4_scaling_beta": 0.1}
    text = cfg("Ministral3ForCausalLM", "ministral3", vocab_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, rope_parameters=rope)
    assert ModelConfig.from_dict(text).attn_temperature == (0.1, 32)
    del rope["llama_4_scaling_beta"]
    with pytest.raises(ValueError, match="llama_4_scaling_beta: Ministral 3 scales its queries"):
        ModelConfig.from_dict(text)


def test_hybrid_model_refused_at_start_up_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(StartupError) as info:
        check_model(str(hybrid_folder(tmp_path)), "unsloth")
    message = str(info.value)
    assert "Qwen3NextForCausalLM model, which sloth-serve cannot run" in message and "\n" not in message
    assert "recurrent or linear-attention state" in message and "generic path" in message


def test_hybrid_model_refused_by_the_loader_before_reading_weights(tmp_path: Path) -> None:
    import torch

    from sloth_serve.loader.checkpoint import load_checkpoint

    with pytest.raises(UnsupportedModel, match="recurrent or linear-attention state"):
        load_checkpoint(hybrid_folder(tmp_path), torch.float32, torch.device("cpu"), "unsloth")
