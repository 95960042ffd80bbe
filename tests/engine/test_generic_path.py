"""The generic path: tiny random models of families with no native model code here (Cohere with q/k
norm and a logit scale, Granite's multipliers, OLMo 2, StableLM with partial RoPE, Cohere 2's
sliding-window and RoPE-less global layers, VaultGemma's attention and final-logit soft-capping) give transformers' greedy tokens through our engine
(chunked prefill, paged decode, several sequences a step), hot-swapped and merged LoRA give PEFT's."""

from __future__ import annotations

import inspect
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.peft import load_lora
from sloth_serve.models.generic import GenericCausalLM
from sloth_serve.models.generic_linear import SliceGroup

VOCAB = 4096  # the demo tokenizer's, so that the same folders can be served over HTTP
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, eos_token_id=2, pad_token_id=0,
    bos_token_id=1,
)
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
           num_key_value_heads=4)
FAMILIES = {
    "cohere": (transformers.CohereConfig, dict(use_qk_norm=True, logit_scale=0.5)),
    "granite": (transformers.GraniteConfig, dict(embedding_multiplier=3.0, residual_multiplier=0.5,
                                                 attention_multiplier=0.2, logits_scaling=2.0)),
    "olmo2": (transformers.Olmo2Config, {}),
    "stablelm": (transformers.StableLmConfig, dict(partial_rotary_factor=0.5, qk_layernorm=True)),
    "cohere2": (transformers.Cohere2Config, dict(sliding_window=8, num_hidden_layers=4)),
    "vaultgemma": (transformers.VaultGemmaConfig, dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                                       sliding_window=8, head_dim=16)),
    # From bench/family_sweep.py's families (bench/results/family-sweep-cpu.md), those Unsloth users fine-tune
    # and those that needed a fix: latent attention (values narrower than keys), a router that is an
    # nn.Linear with its own forward (Phi-MoE), a head that reaches into the backbone's decoder (OPT).
    "deepseek_v3": (transformers.DeepseekV3Config, dict(**MOE, **MLA, first_k_dense_replace=1, n_group=1,
                                                        topk_group=1, n_shared_experts=1)),
    "glm4_moe_lite": (transformers.Glm4MoeLiteConfig, dict(**MOE, **MLA, first_k_dense_replace=1, n_group=1,
                                                           topk_group=1, n_shared_experts=1)),
    "phimoe": (transformers.PhimoeConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "opt": (transformers.OPTConfig, dict(ffn_dim=96, word_embed_proj_dim=64)),
    "olmo3": (transformers.Olmo3Config, dict(sliding_window=8)),
    "seed_oss": (transformers.SeedOssConfig, dict(head_dim=16)),
    "ernie4_5_moe": (transformers.Ernie4_5_MoeConfig, dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32,
                                                           moe_num_shared_experts=1)),
    "hunyuan_v1_moe": (transformers.HunYuanMoEV1Config, dict(num_experts=4, moe_topk=2, head_dim=16)),
    "glm4_moe": (transformers.Glm4MoeConfig, dict(**MOE, first_k_dense_replace=1, n_group=1, topk_group=1,
                                                  n_shared_experts=1)),
    "apertus": (transformers.ApertusConfig, {}),
    "granitemoe": (transformers.GraniteMoeConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
}
MAX_TOKENS = 10
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(tmp: Path, family: str, tokenizer: bool = False,
               spec: tuple[type, dict] | None = None) -> tuple[Path, torch.nn.Module]:
    """A random model of the family (FAMILIES', or `spec`: config class and fields) saved in `tmp/family`
    (with the demo tokenizer if asked), and transformers' own instance of it (eager attention: the reference)."""
    config_cls, extra = spec or FAMILIES[family]
    takes = set(inspect.signature(config_cls.__init__).parameters)  # OPT has no intermediate_size / KV heads
    common = {k: v for k, v in COMMON.items() if k in takes}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**common, **extra}),
                                                          attn_implementation="eager").eval()
    with torch.no_grad():  # random biases and norms so that those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp / family
    model.save_pretrained(folder)
    if tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(DEMO_MODEL / name, folder / name)
    return folder, model


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 19, 45, 8)]


def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,  # type: ignore[operator]
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def engine_for(folder: Path, **settings: object) -> LLMEngine:
    # 24 tokens a step: the 45-token prompt is prefilled in chunks while the others decode beside it
    return LLMEngine(Config(model=str(folder), load_format="safetensors", dtype="float32", num_kv_blocks=64,
                            block_size=8, max_num_batched_tokens=24, **settings))  # type: ignore[arg-type]


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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers(tmp_path: Path, family: str, caplog: pytest.LogCaptureFixture) -> None:
    folder, hf = make_model(tmp_path, family)
    with caplog.at_level(logging.WARNING, logger="sloth_serve.loader.generic"):
        engine = engine_for(folder)
    said = [r.getMessage() for r in caplog.records if "served on the generic path" in r.getMessage()]
    assert len(said) == 1 and "no CUDA graphs" in said[0]
    model = engine.loaded.model
    assert isinstance(model, GenericCausalLM) and engine.runner.graphs is None
    got = run(engine, [(p, 0) for p in prompts()])
    for i, p in enumerate(prompts()):
        assert got[i] == hf_greedy(hf, p), f"{family} prompt {i}"
    assert engine.block_manager.num_free_blocks == 64


def test_prefix_cache_hit_gives_the_same_tokens(tmp_path: Path) -> None:
    folder, hf = make_model(tmp_path, "granite")
    engine = engine_for(folder)
    prompt = prompts()[2]
    first = run(engine, [(prompt, 0)])[0]
    assert first == hf_greedy(hf, prompt)
    longer = prompt + first[:3]
    engine.add_request("again", longer, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    outputs = [out for _ in range(2 * MAX_TOKENS) if engine.has_unfinished_requests for out in engine.step()]
    assert outputs[-1].num_cached_tokens >= 40  # the first prompt's 5 full blocks of 8 came from the cache
    assert [t for out in outputs for t in out.new_token_ids] == hf_greedy(hf, longer)
    assert engine.block_manager.num_free_blocks == 64


def write_adapter(base: torch.nn.Module, folder: Path, seed: int, **lora: object) -> Path:
    """PEFT's own adapter on every projection, with random lora_B (a fresh adapter changes nothing)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, task_type="CAUSAL_LM",
                                                 **lora))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(folder))
    peft_model.unload()  # the base's modules back as they were
    return folder


def peft_greedy(folder: Path, adapter: Path, prompt: list[int]) -> list[int]:
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    return hf_greedy(PeftModel.from_pretrained(base, str(adapter)).eval(), prompt)


@pytest.fixture(scope="module")
def cohere_with_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, list[Path]]:
    tmp = tmp_path_factory.mktemp("generic-lora")
    folder, hf = make_model(tmp, "cohere")
    adapters = [write_adapter(hf, tmp / f"adapter-{i}", seed=i) for i in range(2)]
    return folder, hf, adapters


def test_adapters_apply_per_token_in_one_batch(cohere_with_adapters: tuple[Path, torch.nn.Module, list[Path]]) -> None:
    folder, hf, adapters = cohere_with_adapters
    engine = engine_for(folder, max_loras=2)
    layers = engine.loaded.model.lora_layers()
    assert isinstance(layers["model.layers.0.self_attn.qkv_proj"], SliceGroup)  # q|k|v as adapters name them
    for i, adapter in enumerate(adapters, start=1):
        engine.add_lora(i, load_lora(adapter.name, adapter, 16))
    prompt, other = prompts()[1], prompts()[3]
    # The base and both adapters side by side, twice over, prompts of different lengths.
    requests = [(prompt, 0), (prompt, 1), (other, 2), (other, 1), (prompt, 2)]
    got = run(engine, requests)
    assert got[0] == hf_greedy(hf, prompt)
    for (p, adapter_id), tokens in zip(requests[1:], got[1:], strict=True):
        assert tokens == peft_greedy(folder, adapters[adapter_id - 1], p), f"adapter {adapter_id}"
    assert got[1] != got[0]  # the adapters change the output: the comparison means something


def test_merged_adapter_equals_peft(cohere_with_adapters: tuple[Path, torch.nn.Module, list[Path]]) -> None:
    folder, _, adapters = cohere_with_adapters
    engine = engine_for(folder, merge_lora=str(adapters[0]))
    prompt = prompts()[2]
    assert run(engine, [(prompt, 0)])[0] == peft_greedy(folder, adapters[0], prompt)


def test_adapter_with_its_own_modules_is_refused_saying_why(
        cohere_with_adapters: tuple[Path, torch.nn.Module, list[Path]], tmp_path: Path) -> None:
    folder, hf, _ = cohere_with_adapters
    own = write_adapter(hf, tmp_path / "own-head", seed=5, modules_to_save=["lm_head"])
    engine = engine_for(folder)
    with pytest.raises(ValueError, match=r"served on native families only.*generic path"):
        engine.add_lora(1, load_lora(own.name, own, 16))
    assert run(engine, [(prompts()[0], 0)])[0] == hf_greedy(hf, prompts()[0])  # the engine serves on


@pytest.mark.parametrize("change, message", [("extra", "tensor(s) on disk were not loaded"),
                                             ("missing", "are not on disk")])
def test_every_tensor_on_disk_reaches_the_model(tmp_path: Path, change: str, message: str) -> None:
    from safetensors.torch import load_file, save_file

    folder, _ = make_model(tmp_path, "olmo2")
    tensors = load_file(str(folder / "model.safetensors"))
    if change == "extra":
        tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    else:
        del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(message)):
        engine_for(folder)


def test_attention_the_paged_cache_cannot_compute_is_refused() -> None:
    from sloth_serve.models.families import UnsupportedModel
    from sloth_serve.models.generic import paged_attention_forward
    from sloth_serve.models.generic_step import GenericStep

    q = k = v = torch.zeros(1, 2, 3, 8)
    stranger = torch.nn.Module()  # not a layer of the served model: no step on it
    with pytest.raises(UnsupportedModel, match="not a module of the model being served"):
        paged_attention_forward(stranger, q, k, v, None)
    layer = torch.nn.Module()
    layer.sloth_step = GenericStep()  # type: ignore[assignment]
    with pytest.raises(UnsupportedModel, match="mask its model built itself"):
        paged_attention_forward(layer, q, k, v, torch.zeros(1, 1, 3, 3))
    layer.sinks = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UnsupportedModel, match="attention sinks"):
        paged_attention_forward(layer, q, k, v, None)


def test_window_the_model_applies_outside_attention_is_refused(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Moshi's sliding window reaches transformers' own cache, never its attention call: refused at load
    rather than served with full attention (bench/family_sweep.py found its tokens differ). config.json names
    Moshi first (tests/unit/test_families.py); this is the load-time check behind it, for a family not named."""
    from sloth_serve.models import families

    monkeypatch.setattr(families, "WINDOW_OUTSIDE_ATTENTION", frozenset())
    folder, _ = make_model(tmp_path, "moshi", spec=(transformers.MoshiConfig, dict(sliding_window=8, head_dim=16)))
    with pytest.raises(families.UnsupportedModel,
                       match=r"^MoshiForCausalLM's sliding window \(8\) is applied by transformers' own mask or cache"):
        engine_for(folder)
