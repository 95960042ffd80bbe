"""Fidelity of every bitsandbytes checkpoint layout: greedy tokens equal Unsloth's `for_inference`
on the same pre-quantized folder (dynamic 4-bit with 16-bit parts inside fused projections, FP4,
single and double quantization, fp16 compute dtype, block size 128, a 4-bit lm_head)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from quant_formats import (
    FORMATS,
    QuantFormat,
    compare_greedy,
    exact_needed,
    quantization_config,
    write_quantized,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from sloth_serve import LLM, SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.unsloth import load_hf_with_unsloth
from sloth_serve.models.layers import LoRALinear

QUESTIONS = ["What does `json.dumps` do?", "Explain `os.path.join`."]
MAX_TOKENS = 16
# Logits: where two tokens nearly tie, rounding may pick either (a 16-bit reference beside our
# float32 CPU run; both in bfloat16 on a GPU, with other kernels).
TIE = {torch.float32: 0.05, torch.bfloat16: 0.25, torch.float16: 0.25}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quant-formats")


def prompts_for(folder: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(folder))
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in QUESTIONS]
    return [tok.encode(t) for t in [*chats, "Return the"]]


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.name for f in FORMATS])
def test_greedy_tokens_equal_unsloth_for_inference(fmt: QuantFormat, root: Path) -> None:
    folder = write_quantized(fmt, root)
    qcfg = quantization_config(folder)
    assert qcfg["bnb_4bit_quant_type"] == fmt.quant_type and qcfg["bnb_4bit_use_double_quant"] == fmt.double_quant
    prompts = prompts_for(folder)
    llm = LLM(folder, num_kv_blocks=128)
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]
    assert all(len(t) > 0 for t in ours)
    layers = dict(llm.engine.loaded.model.named_modules())
    tie = TIE[llm.engine.loaded.model.model.embed_tokens.weight.dtype]
    del llm
    reference = load_hf_with_unsloth(folder, 512)
    if fmt.untie_lm_head and torch.cuda.is_available():
        # Seen on the H200: Unsloth's fast CUDA generate fails on a 4-bit lm_head ("Expected size for
        # first two dimensions of batch2 tensor"), so there is no reference there; on CPU there is.
        pytest.xfail("Unsloth's CUDA generate cannot run a bitsandbytes 4-bit lm_head")
    verdicts = [compare_greedy(reference, p, o, tie) for p, o in zip(prompts, ours, strict=True)]
    assert verdicts.count("exact") >= exact_needed(reference, len(verdicts), tie), verdicts  # one near tie at most
    _check_layout(fmt, layers, reference)


def _check_layout(fmt: QuantFormat, ours: dict[str, torch.nn.Module], reference: torch.nn.Module) -> None:
    """The 16-bit and 4-bit parts landed where the checkpoint has them: nothing silently dense."""
    quantized = {n for n, m in reference.named_modules() if hasattr(getattr(m, "weight", None), "quant_state")}
    for name, module in ours.items():
        if not isinstance(module, LoRALinear):
            continue
        parts = ["q_proj", "k_proj", "v_proj"] if name.endswith("qkv_proj") else (
            ["gate_proj", "up_proj"] if name.endswith("gate_up_proj") else [name.rsplit(".", 1)[1]])
        prefix = name.rsplit(".", 1)[0]
        four_bit = [f"{prefix}.{p}" in quantized for p in parts]
        if fmt.quant_type == "fp4":  # our kernels decode NF4 only: FP4 is served dequantized (logged)
            assert not module.is_quantized, name
        elif all(four_bit):
            assert module.is_quantized and module.four_bit_parts is None, name
        elif any(four_bit):  # mixed: served in 16-bit (bench/results/quant-layouts-h200.md)
            assert not module.is_quantized and module.four_bit_parts == four_bit, name
        else:
            assert not module.is_quantized, name
    kept = [q for m in ours.values() if isinstance(m, LoRALinear) for q in (m.quant or []) if q is not None]
    assert all(q.blocksize == fmt.blocksize and q.nested == fmt.double_quant for q in kept)
    if fmt.untie_lm_head:  # quantized in the checkpoint, served dequantized to the same values
        assert "lm_head" in quantized and ours["lm_head"].weight.dtype != torch.uint8
    if fmt.skip_modules is not None and "model.layers.0.self_attn.q_proj" in fmt.skip_modules:
        assert ours["model.layers.0.self_attn.qkv_proj"].four_bit_parts == [False, True, True]


def test_a_tensor_the_model_class_ignores_stops_the_load(root: Path) -> None:
    """transformers drops checkpoint keys its class does not expect; the load must not go on without
    them (here an extra bias on one projection, as a checkpoint of another architecture would have)."""
    from safetensors.torch import load_file, save_file

    folder = write_quantized(QuantFormat("extra-tensor"), root)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(256, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: 1 tensor\(s\) on disk were not loaded "
                                         r"\(first: 'model\.layers\.1\.self_attn\.o_proj\.bias'\)"):
        LLM(folder, num_kv_blocks=64)


def test_a_4bit_folder_read_as_safetensors_keeps_nf4_and_equals_the_unsloth_load(root: Path) -> None:
    """--load-format safetensors reads a bitsandbytes 4-bit folder's bytes as stored (no Unsloth):
    the same NF4 layers, the same greedy tokens as adopting them from Unsloth's model."""
    folder = write_quantized(QuantFormat("as-safetensors"), root)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {}
    for load_format in ("safetensors", "unsloth"):
        llm = LLM(folder, load_format=load_format, num_kv_blocks=64)
        assert sum(getattr(m, "is_quantized", False) for m in llm.engine.loaded.model.modules()) == 4 * 4
        tokens[load_format] = [o.token_ids for o in llm.generate([[5, 17, 99, 200, 3]], params)]
        del llm
    assert tokens["safetensors"] == tokens["unsloth"]


def test_an_8bit_checkpoint_is_refused_naming_the_tensor(root: Path) -> None:
    """bitsandbytes' LLM.int8 weights are int8 with a scale per row, multiplied with outlier columns
    in 16-bit: no 4-bit or 16-bit computation reproduces them, and cast as is they are garbage."""
    model = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.bfloat16,
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    folder = root / "int8"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(DEMO_MODEL)).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"q_proj\.weight is stored as torch\.int8.*4-bit version"):
        LLM(folder, num_kv_blocks=64)
