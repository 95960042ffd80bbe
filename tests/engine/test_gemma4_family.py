"""Gemma 4 on the generic path: tiny random configs with its features on (sliding layers and full
layers of another head dim and KV head count, keys reused as values on full layers, proportional
partial RoPE, the last layers reading earlier layers' KV cache, per-layer input embeddings, the
double-wide MLP of the shared layers, the MoE block beside the MLP, final-logit soft-capping) give
transformers' greedy tokens through our engine (chunked prefill, paged decode, several sequences a
step), and LoRA per request gives PEFT's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader.peft import load_lora
from sloth_serve.models.families import route_of
from sloth_serve.models.generic import GenericCausalLM

VOCAB = 4096  # the demo tokenizer's, so that the same folders can be served over HTTP
LAYER_TYPES = ["sliding_attention", "full_attention"] * 3
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, layer_types=LAYER_TYPES, sliding_window=8,
    max_position_embeddings=256, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
    num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=30.0, initializer_range=0.1,
    eos_token_id=2, pad_token_id=0, bos_token_id=1,
)
CONFIGS = {
    # full layers: keys reused as values, one KV head of 32 (sliding layers: two of 16)
    "k_eq_v": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    # full layers with their own v_proj and the sliding layers' KV head count, and the MoE block
    "moe": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
}
MAX_TOKENS = 10
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def text_config(name: str) -> transformers.Gemma4TextConfig:
    return transformers.Gemma4TextConfig(**{**COMMON, **CONFIGS[name]})


def make_model(tmp: Path, name: str) -> tuple[Path, torch.nn.Module]:
    """A random Gemma4ForCausalLM saved in `tmp/name`, and transformers' own instance (eager attention)."""
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(text_config(name)).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # random norms and layer scalars so that those code paths matter
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(("scale", "per_expert_scale")):
                p.add_(torch.randn_like(p) * 0.3)
        for bname, b in model.named_buffers():
            if bname.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    folder = tmp / name
    model.save_pretrained(folder)
    return folder, model


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 19, 45, 8)]


def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,  # type: ignore[operator]
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def engine_for(folder: Path, tokens_per_step: int = 24, **settings: object) -> LLMEngine:
    # 24 tokens a step: the 45-token prompt is prefilled in chunks while the others decode beside it
    return LLMEngine(Config(model=str(folder), load_format="safetensors", dtype="float32", num_kv_blocks=64,
                            block_size=8, max_num_batched_tokens=tokens_per_step, **settings))  # type: ignore[arg-type]


def run(engine: LLMEngine, requests: list[tuple[list[int], int]]) -> list[list[int]]:
    """Every (prompt, adapter id) in one continuous batch; greedy tokens in request order."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for i, (prompt, adapter_id) in enumerate(requests):
        engine.add_request(str(i), prompt, params, adapter_id)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return [got[str(i)] for i in range(len(requests))]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def gemma4(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return make_model(tmp_path_factory.mktemp("gemma4"), request.param)


def test_routed_to_the_generic_path(gemma4: tuple[Path, torch.nn.Module]) -> None:
    import json

    folder, _ = gemma4
    route = route_of(json.loads((folder / "config.json").read_text()))
    assert (route.path, route.architecture, route.model_type) == ("generic", "Gemma4ForCausalLM", "gemma4_text")


@pytest.mark.parametrize("tokens_per_step", [24, 512])  # chunked prefill beside decodes; each prompt in one pass
def test_greedy_matches_transformers(gemma4: tuple[Path, torch.nn.Module], tokens_per_step: int) -> None:
    folder, hf = gemma4
    engine = engine_for(folder, tokens_per_step)
    model = engine.loaded.model
    assert isinstance(model, GenericCausalLM)
    cfg = model.config
    # Four layers hold a cache (the last two read layers 2 and 3's), of two shapes.
    full = (1, 32) if hf.config.attention_k_eq_v else (2, 32)
    assert cfg.kv_cache_shapes() == [(2, 16), full] * 2 and model.num_attention_layers == 6
    assert [tuple(k.shape[2:]) for k, _ in engine.runner.kv_caches] == [(2, 16), full] * 2
    got = run(engine, [(p, 0) for p in prompts()])
    want = [hf_greedy(hf, p) for p in prompts()]
    assert got == want
    assert len({t for tokens in want for t in tokens}) > 8  # varied output: the comparison means something
    assert engine.block_manager.num_free_blocks == 64


def test_prefix_cache_hit_gives_the_same_tokens(gemma4: tuple[Path, torch.nn.Module]) -> None:
    folder, hf = gemma4
    engine = engine_for(folder)
    prompt = prompts()[2]
    first = run(engine, [(prompt, 0)])[0]
    longer = prompt + first[:3]
    engine.add_request("again", longer, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    outputs = [out for _ in range(2 * MAX_TOKENS) if engine.has_unfinished_requests for out in engine.step()]
    assert outputs[-1].num_cached_tokens >= 40  # the first prompt's 5 full blocks of 8 came from the cache
    assert [t for out in outputs for t in out.new_token_ids] == hf_greedy(hf, longer)


def write_adapter(base: torch.nn.Module, folder: Path, seed: int) -> Path:
    """PEFT's own adapter on every attention and MLP projection the layers have (KV-shared layers
    have no k_proj / v_proj, full layers with keys as values no v_proj), with random lora_B."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(folder))
    peft_model.unload()
    return folder


def test_adapters_apply_per_request_as_peft(gemma4: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    folder, hf = gemma4
    adapters = [write_adapter(hf, tmp_path / f"adapter-{i}", seed=i) for i in range(2)]
    engine = engine_for(folder, max_loras=2)
    for i, adapter in enumerate(adapters, start=1):
        engine.add_lora(i, load_lora(adapter.name, adapter, 16))
    prompt, other = prompts()[1], prompts()[2]
    requests = [(prompt, 0), (prompt, 1), (other, 2), (other, 1), (prompt, 2)]
    got = run(engine, requests)
    assert got[0] == hf_greedy(hf, prompt)
    for (p, adapter_id), tokens in zip(requests[1:], got[1:], strict=True):
        base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
        peft = PeftModel.from_pretrained(base, str(adapters[adapter_id - 1])).eval()
        assert tokens == hf_greedy(peft, p), f"adapter {adapter_id}"
    assert got[1] != got[0]  # the adapters change the output


def test_merged_adapter_equals_peft(gemma4: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    folder, hf = gemma4
    adapter = write_adapter(hf, tmp_path / "adapter", seed=3)
    engine = engine_for(folder, merge_lora=str(adapter))
    prompt = prompts()[2]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    assert run(engine, [(prompt, 0)])[0] == hf_greedy(peft, prompt)


def make_image_text_model(tmp: Path) -> tuple[Path, torch.nn.Module]:
    """A random Gemma4ForConditionalGeneration (the form Gemma 4 checkpoints come in: text, vision
    and audio towers) saved in `tmp/image-text`, and transformers' own instance."""
    vision = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    audio = transformers.Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           output_proj_dims=32, subsampling_conv_channels=[8, 4])
    config = transformers.Gemma4Config(text_config=text_config("k_eq_v").to_dict(), vision_config=vision.to_dict(),
                                       audio_config=audio.to_dict())
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp / "image-text"
    model.save_pretrained(folder)
    return folder, model


def test_text_model_of_an_image_text_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    folder, hf = make_image_text_model(tmp_path)
    route = route_of(json.loads((folder / "config.json").read_text()))
    assert (route.path, route.architecture) == ("generic", "Gemma4ForConditionalGeneration")
    with caplog.at_level(logging.INFO, logger="sloth_serve.loader.generic"):
        engine = engine_for(folder)
    assert any("tensors of its other towers stay on disk" in r.getMessage() for r in caplog.records)
    model = engine.loaded.model
    assert isinstance(model, GenericCausalLM) and model.architecture == "Gemma4ForCausalLM"
    assert not any("tower" in name for name, _ in model.named_parameters())  # never built
    assert run(engine, [(p, 0) for p in prompts()]) == [hf_greedy(hf, p) for p in prompts()]


def test_image_text_checkpoint_with_a_text_tensor_missing_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder, _ = make_image_text_model(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.language_model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="are not on disk"):
        engine_for(folder)


def test_image_text_checkpoint_read_whole_then_cut_to_its_text_model(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Through Unsloth (--load-format unsloth) the image-text model is read whole, as its notebooks load
    it, then cut to the text model's causal LM; transformers' own read of the folder stands in for
    Unsloth's here (Unsloth runs on CUDA only)."""
    import sloth_serve.loader.unsloth as unsloth

    folder, hf = make_image_text_model(tmp_path)
    reads: list[bool] = []

    def read_whole(path: Path, max_seq_length: int, vision: bool = False) -> torch.nn.Module:
        reads.append(vision)
        return transformers.AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()

    monkeypatch.setattr(unsloth, "load_hf_with_unsloth", read_whole)
    engine = LLMEngine(Config(model=str(folder), load_format="unsloth", dtype="float32", num_kv_blocks=64,
                              block_size=8, max_num_batched_tokens=24))
    model = engine.loaded.model
    assert reads == [True] and isinstance(model, GenericCausalLM) and model.architecture == "Gemma4ForCausalLM"
    assert not any("tower" in name for name, _ in model.head.named_parameters())
    assert run(engine, [(p, 0) for p in prompts()]) == [hf_greedy(hf, p) for p in prompts()]
