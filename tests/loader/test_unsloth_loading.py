"""Loading through Unsloth (CPU backend here): 4-bit weights adopted bit-exactly, greedy output equal
to transformers (+ PEFT) computing with the same dequantized weights, merged == hot-swapped."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft_adapters import write_peft_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_kernels.nf4 import dequantize_nf4_ref
from sloth_kernels.nf4_format import NF4Weight
from sloth_serve import LLM, SamplingParams
from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine, startup_adapter_folders
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL
from sloth_serve.loader.checkpoint import resolve_adapter_base
from sloth_serve.loader.peft import load_lora, startup_lora_rank
from sloth_serve.loader.unsloth import load_hf_with_unsloth
from sloth_serve.models.layers import LoRALinear

GREEDY = SamplingParams(max_tokens=20, temperature=0)
QUESTIONS = ["What does `json.dumps` do?", "Explain `os.path.join`.", "What is `list.sort` for?"]


@pytest.fixture(scope="module")
def unsloth_hf() -> torch.nn.Module:
    return load_hf_with_unsloth(DEMO_MODEL, 512)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(lora={"upper": str(DEMO_ADAPTER)}, num_kv_blocks=256)  # the default: Unsloth, 4-bit


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in QUESTIONS]
    return [tok.encode(t) for t in [*chats, "Return the", "The default value"]]


def test_adopted_4bit_weights_dequantize_bit_exactly_like_bitsandbytes(unsloth_hf: torch.nn.Module) -> None:
    checked = 0
    for _name, module in unsloth_hf.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        ours = dequantize_nf4_ref(NF4Weight.from_bnb(module.weight.data, state))
        theirs = bnbf.dequantize_4bit(module.weight.data, state)
        assert torch.equal(ours, theirs)
        checked += 1
    assert checked == 4 * 7  # every projection of every layer is 4-bit


def test_engine_keeps_4bit_layers_and_no_dense_copy(llm: LLM) -> None:
    layers = [m for m in llm.engine.loaded.model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.is_quantized and m.weight is None for m in layers)


def dequantized_reference(unsloth_hf: torch.nn.Module) -> torch.nn.Module:
    """transformers' Llama in float32 holding exactly the weights our 4-bit layers compute with."""
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()
    quantized = {n: m for n, m in unsloth_hf.named_modules() if hasattr(getattr(m, "weight", None), "quant_state")}
    with torch.no_grad():
        for name, module in hf.named_modules():
            if name in quantized:
                q = quantized[name]
                module.weight.copy_(bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).float())
    return hf


def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)  # type: ignore[operator]
    return out[0, len(prompt):].tolist()


def test_4bit_greedy_equals_transformers_and_peft_on_the_same_weights(
    llm: LLM, unsloth_hf: torch.nn.Module, prompts: list[list[int]]
) -> None:
    ref = dequantized_reference(unsloth_hf)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [hf_greedy(ref, p) for p in prompts]
    peft_model = PeftModel.from_pretrained(ref, str(DEMO_ADAPTER)).eval()
    expected = [hf_greedy(peft_model, p) for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, adapter="upper")] == expected


def test_merge_at_load_equals_hot_swapped_adapter(llm: LLM, prompts: list[list[int]]) -> None:
    merged = LLM(merge_lora=str(DEMO_ADAPTER), num_kv_blocks=128)
    layers = [m for m in merged.engine.loaded.model.modules() if isinstance(m, LoRALinear)]
    assert all(not m.is_quantized for m in layers)  # merged layers are 16-bit (dense) now
    hot = [o.token_ids for o in llm.generate(prompts, GREEDY, adapter="upper")]
    assert [o.token_ids for o in merged.generate(prompts, GREEDY)] == hot


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random rank-4 adapter on q and v only, with nonzero B so it changes outputs."""
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("adapters") / "noise"
    model.save_pretrained(folder)
    return folder


def test_mixed_batch_of_base_and_two_adapters_equals_each_alone(
    llm: LLM, second_adapter: Path, prompts: list[list[int]]
) -> None:
    if llm.adapters.get("noise") is None:
        llm.adapters.register("noise", second_adapter)
    names: list[str | None] = [None, "upper", "noise"]
    alone = {n: [llm.generate(p, GREEDY, adapter=n)[0].token_ids for p in prompts[:3]] for n in names}
    assert alone["noise"] != alone[None]
    mixed = llm.generate(prompts[:3] * 3, GREEDY, adapter=[n for n in names for _ in range(3)])
    got = [o.token_ids for o in mixed]
    assert got == alone[None] + alone["upper"] + alone["noise"]


def test_adapter_folder_as_model_resolves_its_local_base(tmp_path: Path) -> None:
    assert resolve_adapter_base(DEMO_ADAPTER) == DEMO_MODEL.resolve()
    hub = tmp_path / "hub-adapter"
    shutil.copytree(DEMO_ADAPTER, hub)
    cfg = json.loads((hub / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "unsloth/llama-3-8b-bnb-4bit"
    (hub / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match=r"not a local folder.*--model"):
        resolve_adapter_base(hub)


def broken_adapter(tmp_path: Path, **changes: object) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(DEMO_ADAPTER, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_adapter_errors_say_what_is_wrong(tmp_path: Path, llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"rank 8 but the adapter slots hold rank 4.*--max-lora-rank 8"):
        load_lora("x", DEMO_ADAPTER, max_rank=4)
    with pytest.raises(ValueError, match="DoRA"):
        load_lora("x", broken_adapter(tmp_path / "a", use_dora=True), 64)
    with pytest.raises(ValueError, match="PEFT type IA3"):
        load_lora("x", broken_adapter(tmp_path / "b", peft_type="IA3"), 64)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json is missing"):
        load_lora("x", tmp_path, 64)
    rs = load_lora("x", broken_adapter(tmp_path / "c", use_rslora=True), 64)
    plain = load_lora("x", DEMO_ADAPTER, 64)
    key = next(iter(plain.tensors))
    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r: sqrt(8) times more here.
    assert torch.allclose(rs.tensors[key][1], plain.tensors[key][1] * 8**0.5)


def test_adapter_for_another_base_is_rejected_with_shapes(tmp_path: Path, llm: LLM) -> None:
    folder = tmp_path / "wide"
    shutil.copytree(DEMO_ADAPTER, folder)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors = {k: torch.cat([v, v], dim=1) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not fit this model"):
        llm.adapters.register("wide", folder)
    assert llm.adapters.get("wide") is None


def test_slot_rank_defaults_to_the_widest_startup_adapter(tmp_path: Path) -> None:
    """--max-lora-rank unset: slots as wide as the widest adapter named at start-up (--lora, inside a
    --lora-dir, the model folder itself), at least 16; set, it is kept."""
    # Written by PEFT: the ranks are the tensors' (a config that disagrees with them is refused).
    wide = write_peft_adapter(tmp_path / "dir" / "wide", r=32, lora_alpha=64, target_modules=["q_proj"])
    patterned = write_peft_adapter(tmp_path / "p", r=8, rank_pattern={"q_proj": 48}, target_modules=["q_proj", "v_proj"])
    assert startup_lora_rank([]) == 16
    assert startup_lora_rank([DEMO_ADAPTER]) == 16  # rank 8: the floor
    assert startup_lora_rank([DEMO_ADAPTER, wide, tmp_path / "not-an-adapter"]) == 32
    assert startup_lora_rank([patterned]) == 48
    config = Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64,
                    lora_modules=(("upper", str(DEMO_ADAPTER)),), lora_dirs=(str(tmp_path / "dir"),))
    assert startup_adapter_folders(config) == [DEMO_ADAPTER, wide]
    assert LLMEngine(config).config.max_lora_rank == 32
    assert startup_adapter_folders(Config(model=str(DEMO_ADAPTER))) == [DEMO_ADAPTER]
    assert LLMEngine(replace(config, max_lora_rank=64)).config.max_lora_rank == 64
