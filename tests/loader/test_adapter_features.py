"""adapter_config.json features, each checked against PEFT itself: adapters written by PEFT on the
demo model (float32, CPU), our greedy tokens and log-probabilities equal PEFT's forward, hot-swapped
in one mixed batch and merged at load (--merge-lora); what we cannot compute exactly is refused
naming the field or tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import IA3Config
from peft_adapters import peft_greedy, write_peft_adapter
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.adapter_config import AdapterError
from sloth_serve.loader.peft import load_lora

MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True, logprobs=0)
TEXTS = ["Return the", "What does `json.dumps` do?", "The default value"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINE = {"load_format": "safetensors", "dtype": "float32", "device": "cpu", "num_kv_blocks": 128}

# Each supported adapter_config feature, as PEFT's LoraConfig arguments.
CASES: dict[str, dict[str, object]] = {
    "rslora": {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ALL},
    # PEFT matches pattern keys against the end of the module name: a bare projection, or one layer's.
    "patterns": {"r": 4, "lora_alpha": 8, "target_modules": ALL,
                 "rank_pattern": {"q_proj": 8, "layers.1.mlp.down_proj": 12}, "alpha_pattern": {"v_proj": 32}},
    "regex-targets": {"r": 6, "lora_alpha": 12, "target_modules": r".*\.(q_proj|up_proj)"},
    "some-layers": {"r": 8, "lora_alpha": 16, "target_modules": ["k_proj", "gate_proj"], "layers_to_transform": [0, 2]},
    # No projection of a Llama has a bias: PEFT saves none, so these serve like bias="none".
    "bias-all": {"r": 8, "lora_alpha": 8, "target_modules": ["o_proj", "down_proj"], "bias": "all"},
    "bias-lora-only": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "lora_only"},
    # Training-only settings: PEFT turns fan_in_fan_out off for nn.Linear, dropout is off in eval.
    "training-only": {"r": 8, "lora_alpha": 16, "target_modules": ["v_proj"], "fan_in_fan_out": True,
                      "lora_dropout": 0.1},
}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    return [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("features")
    out = {name: write_peft_adapter(root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(CASES.items())}
    # PEFT's pickled format (save_pretrained(safe_serialization=False)), read with weights_only.
    out["pickled"] = write_peft_adapter(root / "pickled", seed=99, safe=False, r=8, lora_alpha=16, target_modules=ALL)
    return out


Result = list[tuple[list[int], list[float]]]  # per prompt: greedy tokens, each one's log-probability


@pytest.fixture(scope="module")
def hot_swapped(folders: dict[str, Path], prompts: list[list[int]]) -> dict[str | None, Result]:
    """Every adapter and the base in one continuous batch (None: the base)."""
    llm = LLM(max_loras=len(folders), **ENGINE)
    for name, folder in folders.items():
        llm.adapters.register(name, folder)
    names: list[str | None] = [None, *folders]
    batch = [(name, p) for name in names for p in prompts]
    outs = llm.generate([p for _, p in batch], GREEDY, adapter=[name for name, _ in batch])
    results: dict[str | None, Result] = {name: [] for name in names}
    for (name, _), out in zip(batch, outs, strict=True):
        results[name].append((out.token_ids, [lp.logprob for lp in out.logprobs]))
    return results


def tokens(result: Result) -> list[list[int]]:
    return [t for t, _ in result]


@pytest.mark.parametrize("name", [None, *CASES, "pickled"])
def test_greedy_tokens_and_logprobs_equal_peft(name: str | None, folders: dict[str, Path], prompts: list[list[int]],
                                               hot_swapped: dict[str | None, Result]) -> None:
    expected = peft_greedy(folders[name] if name else None, prompts, MAX_NEW)
    assert tokens(hot_swapped[name]) == tokens(expected)
    for (_, ours), (_, theirs) in zip(hot_swapped[name], expected, strict=True):
        assert ours == pytest.approx(theirs, abs=2e-3)
    if name is not None:  # the adapter visibly changes the output, so equality above means something
        assert tokens(hot_swapped[name]) != tokens(hot_swapped[None])


@pytest.mark.parametrize("name", [*CASES, "pickled"])
def test_merged_at_load_gives_the_hot_swapped_tokens(name: str, folders: dict[str, Path], prompts: list[list[int]],
                                                     hot_swapped: dict[str | None, Result]) -> None:
    merged = LLM(merge_lora=str(folders[name]), **ENGINE)
    assert [o.token_ids for o in merged.generate(prompts, GREEDY)] == tokens(hot_swapped[name])


def test_rank_and_alpha_patterns_pick_each_modules_scale(folders: dict[str, Path]) -> None:
    """PEFT's reading of the patterns: q_proj rank 8 everywhere, layer 1's down_proj rank 12 (the
    other layers' keep r=4), v_proj alpha 32 over its rank 4."""
    weights = load_lora("patterns", folders["patterns"], 16)
    assert weights.rank == 12
    ranks = {key: a.shape[0] for key, (a, _) in weights.tensors.items()}
    assert ranks[("model.layers.0.self_attn.qkv_proj", 0)] == 8  # q
    assert ranks[("model.layers.0.self_attn.qkv_proj", 1)] == 4  # k
    assert ranks[("model.layers.1.mlp.down_proj", 0)] == 12
    assert ranks[("model.layers.2.mlp.down_proj", 0)] == 4
    raw = load_file(str(folders["patterns"] / "adapter_model.safetensors"))
    v_b = raw["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert torch.allclose(weights.tensors[("model.layers.0.self_attn.qkv_proj", 2)][1], v_b * 32 / 4)


def refused(folder: Path) -> str:
    with pytest.raises(AdapterError) as info:
        load_lora("x", folder, 64)
    return str(info.value)


def test_what_cannot_be_computed_exactly_is_refused_naming_it(tmp_path: Path) -> None:
    assert "use_dora=true" in refused(write_peft_adapter(tmp_path / "dora", r=4, target_modules=["q_proj"],
                                                         use_dora=True))
    assert "lora_bias=true" in refused(write_peft_adapter(tmp_path / "lb", r=4, target_modules=["q_proj"],
                                                          lora_bias=True))
    ia3 = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert 'peft_type="IA3"' in refused(write_peft_adapter(tmp_path / "ia3", config=ia3))
    # OLoRA moves part of the base weights into the adapter: the base it trained on is not ours.
    assert 'init_lora_weights="olora"' in refused(write_peft_adapter(tmp_path / "olora", r=4, target_modules=["q_proj"],
                                                                     init_lora_weights="olora"))
    message = refused(write_peft_adapter(tmp_path / "emb", r=4, target_modules=["embed_tokens", "q_proj"]))
    assert "lora_embedding_A" in message and "embed_tokens" in message


def test_a_tensor_the_loader_would_not_use_stops_the_load(tmp_path: Path) -> None:
    folder = write_peft_adapter(tmp_path / "extra", r=4, target_modules=["q_proj"], bias="lora_only")
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    # A trained base bias (what bias="lora_only" saves on a model whose projections have one).
    save_file({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.bias": torch.ones(256)}, str(path))
    assert 'q_proj.bias is a trained base-layer bias (bias="lora_only")' in refused(folder)
    save_file({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(256)},
              str(path))
    assert "lora_magnitude_vector is a DoRA magnitude vector" in refused(folder)
    save_file({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_E.weight": torch.ones(4)}, str(path))
    assert "lora_E.weight is a LoRA tensor of a kind sloth-serve does not know" in refused(folder)
    with pytest.raises(ValueError, match=r"rotary_emb\.inv_freq"):  # whatever else: named by the modules reader
        save_file({**tensors, "base_model.model.model.rotary_emb.inv_freq": torch.ones(16)}, str(path))
        load_lora("x", folder, 64)
