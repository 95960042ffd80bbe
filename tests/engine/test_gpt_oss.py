"""gpt-oss natively: greedy tokens equal transformers' on a tiny random model (attention sinks,
alternating sliding-window layers with prompts longer than the window, YaRN, attention and expert
biases, the clamped SwiGLU) through chunked prefill, paged decode and a batch; every checkpoint
layout of its experts (transformers' 3-D tensors, Unsloth's 16-bit 2-D views and 4-bit per-expert
linears with `router.linear`) loads to the same model; a hot-swapped attention LoRA equals PEFT."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.checkpoint import load_model
from sloth_serve.models.config import ModelConfig
from sloth_serve.models.weights import build_model, iter_checkpoint

WINDOW = 8
CONFIG = dict(
    vocab_size=4096, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=6, num_experts_per_tok=2, sliding_window=WINDOW,
    max_position_embeddings=256, initializer_range=0.3, eos_token_id=1,
    rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                         original_max_position_embeddings=64, rope_theta=150000.0),
)
CPU = torch.device("cpu")


def make_model(tmp: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(**CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # random biases, sinks and norms so that those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("sinks"):
                p.add_(torch.randn_like(p) * 0.5)
    folder = tmp / "gpt-oss"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # for LLM / HTTP
        if (DEMO_MODEL / name).is_file():
            shutil.copy(DEMO_MODEL / name, folder / name)
    return folder, model


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_config_reads_layer_types_sinks_and_experts(tmp_path: Path) -> None:
    folder, _ = make_model(tmp_path)
    cfg = ModelConfig.from_folder(folder)
    assert cfg.family == "gpt_oss" and cfg.layer_windows == (WINDOW, None, WINDOW, None)
    assert cfg.attn_sinks and cfg.qkv_bias and cfg.o_bias and cfg.swiglu_limit == 7.0
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (6, 2, 64)
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "yarn"


def test_greedy_matches_transformers(tmp_path: Path) -> None:
    """Prompts shorter and much longer than the sliding window, prefilled in chunks of 24 tokens
    beside decodes, then decoded past the window."""
    check_greedy(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_matches_transformers_on_gpu(tmp_path: Path) -> None:
    """The same through the Triton kernels (attention with sinks, the grouped gpt-oss experts) and
    CUDA graphs for decode, in float32 so that greedy choices are stable."""
    check_greedy(tmp_path, device="cuda", dtype="float32", cuda_graph_sizes=(1, 2, 4))


def check_greedy(tmp_path: Path, **config: object) -> None:
    from sloth_serve.config import Config
    from sloth_serve.engine.llm_engine import LLMEngine

    folder, hf = make_model(tmp_path)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 384, (n,), generator=gen).tolist() for n in (3, 19, 45, 8)]
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=24, **config))  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    for i, p in enumerate(prompts):
        assert got[str(i)] == hf_greedy(hf, p, 12), f"prompt {i} ({len(p)} tokens)"


def test_sinks_and_window_matter(tmp_path: Path) -> None:
    """The model computes with its sinks and windows: zeroing the sinks or widening the window
    changes the logits of a prompt longer than the window (a forward pass ignoring them would not)."""
    from sloth_serve.models.gpt_oss import GptOssForCausalLM

    folder, hf = make_model(tmp_path)
    ids = torch.randint(2, 384, (1, 30), generator=torch.Generator().manual_seed(2))
    ref = hf(ids).logits[0, -1]
    model = load_model(folder, torch.float32, CPU)
    assert isinstance(model, GptOssForCausalLM)
    torch.testing.assert_close(_last_logits(model, ids[0].tolist()), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.zero_()
    assert not torch.allclose(_last_logits(model, ids[0].tolist()), ref, atol=1e-2)


def _last_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """One prefill of `prompt` through our model on a private paged cache; the last token's logits."""
    from sloth_kernels.attention import AttnMetadata
    from sloth_serve.models.layers import StepMetadata

    cfg = model.config
    n, block = len(prompt), 8
    blocks = -(-n // block)
    caches = [(torch.zeros(blocks, block, cfg.num_kv_heads, cfg.head_dim),
               torch.zeros(blocks, block, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
    attn = AttnMetadata(slot_mapping=torch.arange(n), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                        seq_lens=torch.tensor([n], dtype=torch.int32),
                        query_start_loc=torch.tensor([0, n], dtype=torch.int32), seq_lens_host=[n],
                        query_start_loc_host=[0, n], max_query_len=n, max_seq_len=n)
    meta = StepMetadata(attn=attn)
    with torch.no_grad():
        h = model(torch.tensor(prompt), torch.arange(n), meta, caches)
        return model.compute_logits(h[-1:])[0]


def _unsloth_layout(tensors: dict[str, torch.Tensor], four_bit: bool) -> dict[str, object]:
    """The checkpoint as Unsloth's gpt-oss model names it: router.linear.*, and experts either as
    per-expert linears gate_up_projs.{e} / down_projs.{e} ([out, in], bias) quantized to NF4, or
    as its 16-bit 2-D views of the 3-D tensors (gate_up_proj.weight [E * 2I, H], down_proj.weight
    [H, E * I])."""
    from sloth_kernels.nf4 import quantize_nf4_ref

    out: dict[str, object] = {}
    for name, value in tensors.items():
        if ".mlp.router." in name:
            out[name.replace(".mlp.router.", ".mlp.router.linear.")] = value
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")) and not four_bit:
            e, a, b = value.shape
            perm = (0, 2, 1) if name.endswith("gate_up_proj") else (2, 0, 1)
            shape = (e * b, a) if name.endswith("gate_up_proj") else (b, e * a)
            out[f"{name}.weight"] = value.permute(*perm).reshape(shape).contiguous()
        elif ".experts." in name and four_bit:
            base, _, kind = name.rpartition(".experts.")
            proj = kind.removesuffix("_bias")
            for e in range(value.shape[0]):
                key = f"{base}.experts.{proj}s.{e}"
                if kind.endswith("_bias"):
                    out[f"{key}.bias"] = value[e]
                else:
                    out[f"{key}.weight"] = quantize_nf4_ref(value[e].t().contiguous())
        else:
            out[name] = value
    return out


def test_unsloth_layouts_load_like_transformers_layout(tmp_path: Path) -> None:
    """Unsloth's 16-bit 2-D views load to exactly transformers' model; its 4-bit per-expert layers
    are adopted packed (no 16-bit experts kept) and compute what their dequantized weights do."""
    from sloth_kernels.nf4 import dequantize_nf4_ref
    from sloth_serve.models.gpt_oss_experts import GptOssExperts

    folder, _ = make_model(tmp_path)
    cfg = ModelConfig.from_folder(folder)
    tensors = dict(iter_checkpoint(folder))
    ref = load_model(folder, torch.float32, CPU)
    views = build_model(cfg, iter(_unsloth_layout(tensors, four_bit=False).items()), torch.float32, CPU)
    for (name, a), (_, b) in zip(ref.named_parameters(), views.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    quantized = _unsloth_layout(tensors, four_bit=True)
    ours = build_model(cfg, iter(quantized.items()), torch.float32, CPU)
    dense = {k: v if isinstance(v, torch.Tensor) else dequantize_nf4_ref(v).t() for k, v in quantized.items()}
    dense_model = build_model(cfg, iter(_per_expert_16bit(dense).items()), torch.float32, CPU)
    experts = [m for m in ours.modules() if isinstance(m, GptOssExperts)]
    assert len(experts) == 4 and all(e.is_quantized and e.gate_up_proj is None for e in experts)
    x = torch.randn(9, 64)
    for layer_q, layer_d in zip(ours.model.layers, dense_model.model.layers, strict=True):
        torch.testing.assert_close(layer_q.mlp(x), layer_d.mlp(x), rtol=1e-5, atol=1e-5)


def _per_expert_16bit(dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert 16-bit linears ([out, in]) from tensors transposed back to [in, out]."""
    return {k: v.t().contiguous() if k.endswith(".weight") and "_projs." in k else v for k, v in dense.items()}


def test_checkpoint_missing_an_expert_bias_is_refused(tmp_path: Path) -> None:
    folder, _ = make_model(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.down_proj_bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing weights.*model.layers.1.mlp.experts.0.down_bias"):
        load_model(folder, torch.float32, CPU)


def test_attention_lora_hot_swapped_equals_peft(tmp_path: Path) -> None:
    """LoRA on q/k/v/o (what PEFT targets on gpt-oss's attention), served beside the base in one LLM:
    the adapter's greedy tokens equal PEFT's, the base's equal transformers'."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from sloth_serve import LLM

    folder, hf = make_model(tmp_path)
    torch.manual_seed(3)
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                           "o_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft.save_pretrained(str(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    llm = LLM(str(folder), load_format="safetensors", num_kv_blocks=64, lora={"a": str(tmp_path / "adapter")})
    prompts = [[5, 17, 99, 200, 3], list(range(10, 40))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with_adapter = [o.token_ids for o in llm.generate(prompts, params, adapter="a")]
    for p, got in zip(prompts, with_adapter, strict=True):
        assert got == hf_greedy(tuned, p, 8)
    without = [o.token_ids for o in llm.generate(prompts, params)]
    with tuned.disable_adapter():
        assert without == [hf_greedy(tuned, p, 8) for p in prompts]
    assert with_adapter != without  # the adapter mattered


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' [E, in, out] expert weight -> MXFP4 (blocks [E, out, in / 32, 16] uint8, scales
    [E, out, in / 32] uint8): per 32 values a power-of-two scale, each value the nearest FP4 code."""
    from sloth_serve.models.mxfp4 import FP4_VALUES

    groups = w.transpose(1, 2).unflatten(-1, (-1, 32)).float()  # [E, out, G, 32]
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 128)
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    codes = (scaled.unsqueeze(-1) - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def test_mxfp4_original_equals_transformers_dequantizing_it(tmp_path: Path) -> None:
    """A checkpoint laid out as OpenAI's originals (experts as MXFP4 blocks and scales, the rest
    16-bit, quant_method mxfp4) loads under either format, experts dequantized as transformers'
    Mxfp4Config(dequantize=True) does: the same greedy tokens."""
    import json

    from sloth_serve import LLM

    folder, _ = make_model(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(tensors.pop(name))
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").eval().float()  # it keeps the dequantized experts in bfloat16: compute in float32
    prompts = [[5, 17, 99, 200, 3], list(range(10, 40))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for load_format in ("safetensors", "unsloth"):
        llm = LLM(str(folder), load_format=load_format, num_kv_blocks=64)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert got == [hf_greedy(hf, p, 8) for p in prompts], load_format


def test_mxfp4_start_up_check_names_it_and_other_models_stay_refused(tmp_path: Path) -> None:
    from sloth_serve.preflight import StartupError, check_quantization

    quant = {"quant_method": "mxfp4"}
    assert "MXFP4" in check_quantization(tmp_path, quant, "unsloth", "gpt_oss")
    with pytest.raises(StartupError, match="MXFP4"):
        check_quantization(tmp_path, quant, "unsloth", "llama")


def test_norm_scales_are_ready_after_load(tmp_path: Path) -> None:
    """Every RMSNorm's float32 scale is computed at load, before any step (a first step may be a CUDA
    graph capture, in which a tensor made for the cache would hold nothing once outside it)."""
    from sloth_serve.models.gpt_oss import GptOssRMSNorm

    folder, _ = make_model(tmp_path)
    model = load_model(folder, torch.float32, CPU)
    norms = [m for m in model.modules() if isinstance(m, GptOssRMSNorm)]
    assert len(norms) == 2 * 4 + 1 and all(m._scale is not None and m._scale[0] is m.weight for m in norms)
