"""Adapter folders that are broken or do not belong to the model are refused at load with one
message naming the file and field (a 400 at run time, a one-line error at start-up), never a crash
later in an engine step; a bad folder in a --lora-dir is passed over at start-up with a warning."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from peft_adapters import Tensors, copy_demo_adapter, first_key, write_peft_adapter

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_ADAPTER
from sloth_serve.loader.adapter_config import AdapterError
from sloth_serve.loader.adapter_layout import check_adapter_folder
from sloth_serve.loader.peft import LoRAWeights, load_lora, startup_lora_rank

GREEDY = SamplingParams(max_tokens=6, temperature=0)


def shrink_b(t: Tensors) -> Tensors:
    key = first_key(t, "lora_B")
    return {**t, key: t[key][:, :4].contiguous()}


def shrink_both(t: Tensors) -> Tensors:
    return {k: v[:4].contiguous() if ".lora_A." in k else v[:, :4].contiguous() for k, v in t.items()}


def as_int(t: Tensors) -> Tensors:
    return {k: (v * 100).to(torch.int32) for k, v in t.items()}


def drop_a(t: Tensors) -> Tensors:
    return {k: v for k, v in t.items() if k != first_key(t, "lora_A")}


def rename_q(t: Tensors) -> Tensors:
    return {k.replace("q_proj", "fc1"): v for k, v in t.items()}


def one_d(t: Tensors) -> Tensors:
    key = first_key(t, "lora_A")
    return {**t, key: t[key].flatten()}


# name -> (how to break the demo adapter, what the message must say)
BROKEN: dict[str, tuple[dict, str]] = {
    "b-rank": ({"tensors": shrink_b}, "lora_A has rank 8 but its lora_B has rank 4"),
    "r-disagrees": ({"tensors": shrink_both}, "LoRA has rank 4 but adapter_config.json says 8 (r)"),
    "r-zero": ({"config": {"r": 0}}, "r=0 is not a rank"),
    "r-null": ({"config": {"r": None}}, "r=null is not a rank"),
    "r-string": ({"config": {"r": "8"}}, 'r="8" is not a rank'),
    "r-float": ({"config": {"r": 8.5}}, "r=8.5 is not a rank"),
    "r-missing": ({"drop": ("r",)}, "has no `r`"),
    "rank-pattern-1e9": ({"config": {"rank_pattern": {"q_proj": 10**9}}}, "says 1000000000 (rank_pattern)"),
    "rank-pattern-type": ({"config": {"rank_pattern": {"q_proj": "wide"}}}, "rank_pattern['q_proj']=\"wide\""),
    "rank-pattern-list": ({"config": {"rank_pattern": [8]}}, "rank_pattern=[8] is not an object"),
    "alpha-string": ({"config": {"lora_alpha": "16"}}, 'lora_alpha="16" is not a finite number'),
    "rslora-string": ({"config": {"use_rslora": "yes"}}, 'use_rslora="yes" is not true or false'),
    "targets-number": ({"config": {"target_modules": 7}}, "target_modules=7 is neither"),
    "bad-regex": ({"config": {"target_modules": "(q_proj"}}, "is not a regular expression"),
    "layers-type": ({"config": {"layers_to_transform": "0"}}, 'layers_to_transform="0" is not a layer index'),
    "bias-value": ({"config": {"bias": "some"}}, 'bias="some" is not one of none, all, lora_only'),
    "peft-type": ({"config": {"peft_type": "PREFIX_TUNING"}}, 'peft_type="PREFIX_TUNING"'),
    "json-list": ({"raw_config": "[]"}, "holds a JSON list, not an object"),
    "json-invalid": ({"raw_config": "{not json"}, "adapter_config.json is not readable JSON"),
    "int-tensors": ({"tensors": as_int}, "is of dtype I32; LoRA weights must be floating point"),
    "lacks-a": ({"tensors": drop_a}, "but no lora_A"),
    "one-d": ({"tensors": one_d}, "a LoRA factor is a 2-D matrix"),
    "untargeted": ({"tensors": rename_q}, "holds LoRA weights for model.layers.0.self_attn.fc1, which target_modules"),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    return {name: copy_demo_adapter(root / name, **how) for name, (how, _) in BROKEN.items()}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_adapter_is_refused_naming_what_is_wrong(name: str, broken: dict[str, Path]) -> None:
    with pytest.raises(AdapterError, match="^" + re.escape(f"{name}/adapter_")):  # the file, then the field
        load_lora(name, broken[name], 64)
    with pytest.raises(AdapterError) as info:
        load_lora(name, broken[name], 64)
    assert BROKEN[name][1] in str(info.value)
    assert "\n" not in str(info.value)
    # The same verdict from the start-up check, which reads only the config and the file's header.
    with pytest.raises(AdapterError, match="^" + re.escape(f"{name}/adapter_")):
        check_adapter_folder(broken[name])


def test_corrupt_or_missing_weights_are_refused(tmp_path: Path) -> None:
    truncated = copy_demo_adapter(tmp_path / "truncated")
    path = truncated / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(AdapterError, match=r"truncated/adapter_model\.safetensors: tensor .* lies past the end"):
        load_lora("t", truncated, 64)
    garbage = copy_demo_adapter(tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(AdapterError, match=r"garbage/adapter_model\.safetensors is not a readable safetensors file"):
        load_lora("g", garbage, 64)
    missing = copy_demo_adapter(tmp_path / "missing")
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors"):
        load_lora("m", missing, 64)
    pickled = copy_demo_adapter(tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterError, match=r"pickled/adapter_model\.bin could not be read as PyTorch tensors"):
        load_lora("p", pickled, 64)


def test_adapter_wider_than_the_slots_names_the_flag() -> None:
    with pytest.raises(AdapterError, match=r"rank 8 but the adapter slots hold rank 4.*--max-lora-rank 8"):
        load_lora("x", DEMO_ADAPTER, max_rank=4)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(lora={"upper": str(DEMO_ADAPTER)}, load_format="safetensors", dtype="float32", num_kv_blocks=64)


def test_adapter_for_another_base_is_refused_before_the_engine(tmp_path: Path, llm: LLM) -> None:
    wide = copy_demo_adapter(tmp_path / "wide", tensors=lambda t: {
        k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"does not fit this model: .* is 256x512, the adapter's is 256x1024"):
        llm.adapters.register("wide", wide)
    # A module this model has no LoRA for (here: layer 9 of a 4-layer model).
    deep = copy_demo_adapter(tmp_path / "deep", tensors=lambda t: {k.replace("layers.0.", "layers.9."): v
                                                                   for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"targets model\.layers\.9\.\S+, which the model lacks"):
        llm.adapters.register("deep", deep)
    assert llm.adapters.get("wide") is None and llm.adapters.get("deep") is None


def test_engine_refuses_mismatched_factors_that_bypass_the_loader(llm: LLM) -> None:
    """The engine's own check: a slot write that failed in a step would stop the engine for all."""
    upper, base = (llm.generate("Return the", GREEDY, adapter=a)[0].token_ids for a in ("upper", None))
    good = load_lora("upper", DEMO_ADAPTER, 64)
    key = next(iter(good.tensors))
    a, b = good.tensors[key]
    bad = LoRAWeights("bad", "x", 8, None, {**good.tensors, key: (a, b[:, :4])})
    with pytest.raises(ValueError, match=r"has rank 8 \(A\) / 4 \(B\)"):
        llm.engine.add_lora(99, bad)
    assert llm.generate("Return the", GREEDY, adapter="upper")[0].token_ids == upper != base
    assert llm.generate("Return the", GREEDY)[0].token_ids == base


def test_bad_lora_dir_folders_are_passed_over_at_startup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """[] as a config, a rank_pattern of 1e9 (once: slots a billion wide), a corrupt file: warnings,
    and the slots sized from the adapters that can be served."""
    root = tmp_path / "dir"
    root.mkdir()
    copy_demo_adapter(root / "list", raw_config="[]")
    copy_demo_adapter(root / "huge", config={"rank_pattern": {"q_proj": 10**9}})
    wide = write_peft_adapter(root / "wide", r=32, lora_alpha=32, target_modules=["q_proj"])
    with caplog.at_level(logging.WARNING, logger="sloth_serve.loader.peft"):
        assert startup_lora_rank(sorted(root.iterdir())) == 32
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "list cannot be served and is passed over" in warned and "huge cannot be served" in warned
    assert "wide cannot" not in warned
    served = LLM(lora_dirs=(str(root),), load_format="safetensors", dtype="float32", num_kv_blocks=64)
    assert served.engine.config.max_lora_rank == 32
    served.adapters.register("wide", wide)
    assert served.generate("Return the", GREEDY, adapter="wide")[0].token_ids
