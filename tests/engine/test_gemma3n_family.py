"""Gemma 3n's text model on the generic path: a tiny random Gemma3nForCausalLM with every feature on
(AltUp streams, LAuReL, per-layer inputs, KV-shared last layers reading earlier layers' paged cache,
gaussian top-k activation sparsity, sliding and global layers, final-logit soft-capping) gives
transformers' greedy tokens in one pass, in chunked prefill and from the prefix cache; a
Gemma3nForConditionalGeneration checkpoint serves its text model with the towers' tensors left on disk;
LoRA per request (adapters named for either checkpoint) and merged gives PEFT's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_generic_path import MAX_TOKENS, hf_greedy, peft_greedy, prompts, run, write_adapter

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.peft import load_lora
from sloth_serve.models.families import TEXT_ONLY_ARCHITECTURES, route_of
from sloth_serve.models.generic import GenericCausalLM

LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
               "full_attention"]


def gemma3n_config() -> transformers.Gemma3nTextConfig:
    """Six layers, the last two reading the caches of layers 3 (sliding) and 2 (global); the first two sparse."""
    return transformers.Gemma3nTextConfig(
        vocab_size=4096, vocab_size_per_layer_input=4096, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=[96, 96, 128, 96, 96, 128], num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, layer_types=LAYER_TYPES, sliding_window=8, num_kv_shared_layers=2, laurel_rank=4,
        altup_num_inputs=3, activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0], final_logit_softcapping=5.0,
        max_position_embeddings=256, initializer_range=0.3, eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )


def make_gemma3n(tmp: Path) -> tuple[Path, torch.nn.Module]:
    """The random text model saved in `tmp/gemma3n` with the demo tokenizer, and transformers' instance."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(gemma3n_config(), attn_implementation="eager").eval()
    with torch.no_grad():  # norms away from their initial values, so that each one matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp / "gemma3n"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_MODEL / name, folder / name)
    return folder, model


def make_multimodal(text_folder: Path, folder: Path) -> Path:
    """The text model as a Gemma3nForConditionalGeneration checkpoint: its tensors under
    model.language_model., beside image and audio tower tensors (transformers' own multimodal class
    needs timm for its vision tower, so the checkpoint is written by hand)."""
    folder.mkdir(parents=True)
    tensors = load_file(text_folder / "model.safetensors")
    out = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in tensors.items() if k.startswith("model.")}
    assert len(out) == len(tensors)  # the head is tied: no lm_head on disk
    out |= {"model.vision_tower.timm_model.conv_stem.conv.weight": torch.randn(8, 3, 3, 3),
            "model.audio_tower.subsample_conv_projection.conv_0.conv.weight": torch.randn(4, 1, 3, 3),
            "model.embed_vision.embedding.weight": torch.randn(16, 64),
            "model.embed_audio.embedding.weight": torch.randn(16, 64)}
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = transformers.Gemma3nConfig(text_config=json.loads((text_folder / "config.json").read_text())).to_dict()
    config["architectures"] = ["Gemma3nForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(text_folder / name, folder / name)
    return folder


def engine_for(folder: Path, budget: int = 24, **settings: object) -> LLMEngine:
    """24 tokens a step: the 45-token prompt is prefilled in chunks while the others decode beside it
    (and past the sliding window of 8); 256: every prompt in one pass."""
    return LLMEngine(Config(model=str(folder), load_format="safetensors", dtype="float32", num_kv_blocks=64,
                            block_size=8, max_num_batched_tokens=budget, **settings))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gemma3n(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    tmp = tmp_path_factory.mktemp("gemma3n")
    folder, hf = make_gemma3n(tmp)
    return folder, make_multimodal(folder, tmp / "gemma3n-mm"), hf


def test_routes_to_the_generic_path() -> None:
    text = gemma3n_config().to_dict()
    assert route_of({**text, "architectures": ["Gemma3nForCausalLM"]}).path == "generic"
    multimodal = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n", "text_config": text}
    assert route_of(multimodal).path == "generic"
    assert "Gemma3nForConditionalGeneration" in TEXT_ONLY_ARCHITECTURES


@pytest.mark.parametrize("budget", [24, 256], ids=["chunked-prefill", "one-pass"])
@pytest.mark.parametrize("checkpoint", ["causal-lm", "conditional-generation"])
def test_greedy_matches_transformers(gemma3n: tuple[Path, Path, torch.nn.Module], budget: int, checkpoint: str) -> None:
    text_folder, mm_folder, hf = gemma3n
    engine = engine_for(text_folder if checkpoint == "causal-lm" else mm_folder, budget)
    model = engine.loaded.model
    assert isinstance(model, GenericCausalLM)
    # The two KV-shared layers read layers 3 and 2's caches: four layers of cache for six of attention.
    assert (model.config.num_layers, model.num_attention_layers) == (4, 6)
    assert model.config.layer_windows == (8, 8, None, 8)
    got = run(engine, [(p, 0) for p in prompts()])
    for i, p in enumerate(prompts()):
        assert got[i] == hf_greedy(hf, p), f"{checkpoint} prompt {i}"
    assert engine.block_manager.num_free_blocks == 64


def test_towers_left_on_disk_are_the_only_unread_tensors(gemma3n: tuple[Path, Path, torch.nn.Module],
                                                         tmp_path: Path) -> None:
    """A tensor of the text model that the model does not have is still refused, in a multimodal folder too."""
    _, mm_folder, _ = gemma3n
    folder = tmp_path / "extra"
    shutil.copytree(mm_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.language_model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="were not loaded by Gemma3nForCausalLM"):
        engine_for(folder)


def as_multimodal(adapter: Path) -> None:
    """The adapter's tensors named as PEFT names them on Gemma3nForConditionalGeneration (what
    Unsloth's notebooks save): model.language_model.layers.* rather than model.layers.*."""
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    renamed = {k.replace(".model.layers.", ".model.language_model.layers."): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, path, metadata={"format": "pt"})


def test_adapters_apply_per_token_in_one_batch(gemma3n: tuple[Path, Path, torch.nn.Module], tmp_path: Path) -> None:
    """Two PEFT adapters on every projection (the KV-shared layers have q and o only), the second
    named as on the image-text model, and the base in one continuous batch served from the multimodal
    checkpoint: each request gets PEFT's tokens (the reference reads the first naming)."""
    text_folder, mm_folder, hf = gemma3n
    references = [write_adapter(hf, tmp_path / f"adapter-{i}", seed=i) for i in range(2)]
    adapters = [references[0], tmp_path / "adapter-1-multimodal"]
    shutil.copytree(references[1], adapters[1])
    as_multimodal(adapters[1])
    engine = engine_for(mm_folder, max_loras=2)
    for i, adapter in enumerate(adapters, start=1):
        engine.add_lora(i, load_lora(adapter.name, adapter, 16))
    ps = prompts()
    requests = [(ps[0], 1), (ps[1], 2), (ps[2], 0), (ps[3], 1)]
    got = run(engine, requests)
    for (prompt, adapter_id), tokens in zip(requests, got, strict=True):
        want = hf_greedy(hf, prompt) if adapter_id == 0 else peft_greedy(text_folder, references[adapter_id - 1], prompt)
        assert tokens == want, f"adapter {adapter_id}"
    assert got[0] != hf_greedy(hf, ps[0])  # the adapter is applied, not ignored


@torch.no_grad()
def greedy_with_small_per_layer_table(hf: torch.nn.Module, prompt: list[int], limit: int) -> list[int]:
    """transformers' text model fed as Gemma3nModel feeds it (per-layer inputs read at id 0 for ids
    at or above the table's size), greedy by recomputing the whole sequence each token."""
    ids = list(prompt)
    for _ in range(MAX_TOKENS):
        t = torch.tensor([ids])
        per_layer = hf.model.get_per_layer_inputs(torch.where(t < limit, t, torch.zeros_like(t)))
        out = hf.model(inputs_embeds=hf.model.embed_tokens(t), per_layer_inputs=per_layer, use_cache=False)
        ids.append(int(hf.lm_head(out.last_hidden_state[0, -1]).argmax()))  # soft-capping keeps the order
    return ids[len(prompt):]


def test_ids_past_the_per_layer_table_read_its_first_row(tmp_path: Path) -> None:
    """Real Gemma 3n checkpoints' per-layer table stops at the image and audio tokens (262144 of 262400
    ids): such an id, in a prompt or generated, reads row 0 there instead of failing the step."""
    limit = 3000
    config = gemma3n_config()
    config.vocab_size_per_layer_input = limit
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "gemma3n")
    engine = engine_for(tmp_path / "gemma3n")
    ps = [[*p, 4095, 3000] for p in prompts()[:3]]
    got = run(engine, [(p, 0) for p in ps])
    for prompt, tokens in zip(ps, got, strict=True):
        assert tokens == greedy_with_small_per_layer_table(hf, prompt, limit)


def test_prefix_cache_hit_gives_the_same_tokens(gemma3n: tuple[Path, Path, torch.nn.Module]) -> None:
    """A prompt whose first blocks come from the prefix cache: the KV-shared layers read their source
    layers' cached blocks, which this step did not write."""
    text_folder, _, hf = gemma3n
    engine = engine_for(text_folder)
    prompt = prompts()[2]
    first = run(engine, [(prompt, 0)])[0]
    longer = prompt + first[:3]
    engine.add_request("again", longer, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    outputs = [out for _ in range(2 * MAX_TOKENS) if engine.has_unfinished_requests for out in engine.step()]
    assert outputs[-1].num_cached_tokens >= 40  # the first prompt's 5 full blocks of 8
    assert [t for out in outputs for t in out.new_token_ids] == hf_greedy(hf, longer)


def test_merged_adapter_equals_peft(gemma3n: tuple[Path, Path, torch.nn.Module], tmp_path: Path) -> None:
    text_folder, mm_folder, hf = gemma3n
    adapter = write_adapter(hf, tmp_path / "adapter", seed=7)
    engine = engine_for(mm_folder, merge_lora=str(adapter))
    prompt = prompts()[1]
    assert run(engine, [(prompt, 0)])[0] == peft_greedy(text_folder, adapter, prompt)
