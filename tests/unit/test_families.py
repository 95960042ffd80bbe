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


# Families whose attention the generic path cannot compute, which bench/family_sweep.py saw refused only at load
# (after building the model): each is refused from config.json alone, with the reason the load-time check gave.
SINKS = "it uses attention sinks, which the generic path's attention does not apply"
ATTENTION_REFUSED = {
    "diffllama": (cfg("DiffLlamaForCausalLM", "diffllama", lambda_std_dev=0.1),
                  "its differential attention calls attention twice a layer"),
    "doge": (cfg("DogeForCausalLM", "doge", keep_window_size=2048),
             "its dynamic mask attention adds a mask computed from its values to every attention score"),
    "granite_swa": (cfg("GraniteSWAForCausalLM", "granite_swa", sliding_window=128), SINKS),
    "granitemoe_swa": (cfg("GraniteMoeSWAForCausalLM", "granitemoe_swa", sliding_window=128), SINKS),
    "mimo_v2_flash": (cfg("MiMoV2FlashForCausalLM", "mimo_v2_flash",
                          layer_types=["full_attention", "sliding_attention"]), SINKS),
    "moshi": (cfg("MoshiForCausalLM", "moshi", sliding_window=16, max_position_embeddings=256),
              "its sliding window (16) is applied by transformers' own mask or cache rather than passed to its "
              "attention, so the paged attention cannot apply it"),
}


def config_only_folder(tmp_path: Path, family: str) -> Path:
    """A model folder with config.json and a tokenizer but no weights: whatever refuses it read config.json alone."""
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ATTENTION_REFUSED[family][0]))
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize("family", list(ATTENTION_REFUSED))
def test_attention_refused_from_config_json(family: str) -> None:
    config, reason = ATTENTION_REFUSED[family]
    with pytest.raises(UnsupportedModel) as info:
        route_of(config)
    assert str(info.value).startswith(reason) and "\n" not in str(info.value)


@pytest.mark.parametrize("config", [
    cfg("MoshiForCausalLM", "moshi", sliding_window=3000, max_position_embeddings=3000),  # the window never applies
    cfg("MiMoV2FlashForCausalLM", "mimo_v2_flash", layer_types=["full_attention"] * 2),  # no sliding layer: no sinks
    cfg("GraniteForCausalLM", "granite", sliding_window=128),  # Granite without SWA has no sinks
])
def test_the_same_families_without_that_attention_take_the_generic_path(config: dict) -> None:
    assert route_of(config).path == "generic"


@pytest.mark.parametrize("family", list(ATTENTION_REFUSED))
def test_attention_refused_at_start_up_without_weights(tmp_path: Path, family: str) -> None:
    config, reason = ATTENTION_REFUSED[family]
    with pytest.raises(StartupError) as info:
        check_model(str(config_only_folder(tmp_path, family)), "unsloth")
    message = str(info.value)
    assert f"{config['architectures'][0]} model, which sloth-serve cannot run: {reason}" in message
    assert "\n" not in message


@pytest.mark.parametrize("family", list(ATTENTION_REFUSED))
def test_attention_refused_by_llm_without_weights(tmp_path: Path, family: str) -> None:
    from sloth_serve import LLM

    with pytest.raises(UnsupportedModel) as info:
        LLM(config_only_folder(tmp_path, family), load_format="safetensors", dtype="float32")
    assert str(info.value).startswith(ATTENTION_REFUSED[family][1])


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
