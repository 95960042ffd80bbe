"""Our mixture-of-experts forward pass equals transformers on tiny random Qwen3-MoE, Qwen2-MoE (shared
expert, a dense layer via mlp_only_layers) and Mixtral models, through chunked prefill, paged decode
and a batch of several sequences; checkpoints with per-expert or fused 3-D expert tensors load the
same, and a checkpoint short of an expert is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader.checkpoint import load_model
from sloth_serve.models.config import ModelConfig

COMMON = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, eos_token_id=1,
)
FAMILIES = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40,
                                                    norm_topk_prob=True, head_dim=24)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                                    shared_expert_intermediate_size=48, mlp_only_layers=[0])),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
}


def make_model(tmp: Path, family: str) -> tuple[Path, torch.nn.Module]:
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = config_cls(**COMMON, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # random biases and norms so that those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp / family
    model.save_pretrained(folder)
    return folder, model


def engine_greedy(folder: Path, prompts: list[list[int]], max_tokens: int = 10) -> dict[str, list[int]]:
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=24))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    assert engine.block_manager.num_free_blocks == 64
    return got


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers(tmp_path: Path, family: str) -> None:
    folder, hf = make_model(tmp_path, family)
    cfg = ModelConfig.from_folder(folder)
    assert cfg.num_experts == FAMILIES[family][1].get("num_experts", 4) and cfg.num_experts_per_tok == 2
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 384, (n,), generator=gen).tolist() for n in (3, 19, 45, 8)]
    got = engine_greedy(folder, prompts)
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert got[str(i)] == ref, f"{family} prompt {i}"


def test_qwen2_moe_layers_sparse_or_dense_as_configured(tmp_path: Path) -> None:
    from sloth_serve.models.moe import SparseMoeBlock

    folder, _ = make_model(tmp_path, "qwen2_moe")
    model = load_model(folder, torch.float32, torch.device("cpu"))
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["MLP", "SparseMoeBlock"]
    block = model.model.layers[1].mlp
    assert isinstance(block, SparseMoeBlock) and block.shared_expert is not None


def test_fused_expert_tensors_load_like_per_expert_ones(tmp_path: Path) -> None:
    """transformers 5 holds experts as 3-D gate_up_proj / down_proj; a checkpoint in that layout
    gives the same model as save_pretrained's per-expert one."""
    folder, hf = make_model(tmp_path, "qwen3_moe")
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (fused / f.name).write_bytes(f.read_bytes())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    a = load_model(folder, torch.float32, torch.device("cpu"))
    b = load_model(fused, torch.float32, torch.device("cpu"))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_checkpoint_missing_an_expert_is_refused(tmp_path: Path) -> None:
    folder, _ = make_model(tmp_path, "mixtral")
    tensors = load_file(str(folder / "model.safetensors"))
    dropped = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del tensors[dropped]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing weights.*model.layers.1.mlp.experts.3.down"):
        load_model(folder, torch.float32, torch.device("cpu"))


def test_attention_and_shared_expert_lora_equals_peft(tmp_path: Path) -> None:
    """LoRA on attention, the dense layer's MLP and Qwen2-MoE's shared expert (LoRALinear as in the dense
    families): our greedy tokens with the adapter equal PEFT's, and differ from the base's."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from sloth_serve import LLM

    folder, hf = make_model(tmp_path, "qwen2_moe")
    torch.manual_seed(3)
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj",
                                                                           "down_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    assert any("shared_expert.gate_proj.lora_A" in n for n, _ in peft.named_parameters())
    peft.save_pretrained(str(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    llm = LLM(str(folder), load_format="safetensors", num_kv_blocks=64, lora={"a": str(tmp_path / "adapter")})
    prompts = [[5, 17, 99, 200, 3], list(range(10, 40))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with_adapter = [o.token_ids for o in llm.generate(prompts, params, adapter="a")]
    for p, got in zip(prompts, with_adapter, strict=True):
        ref = tuned.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist()
        assert got == ref
    assert with_adapter != [o.token_ids for o in llm.generate(prompts, params)]  # the adapter mattered


def test_4bit_experts_compute_like_their_dequantized_weights(tmp_path: Path) -> None:
    """Experts a 4-bit checkpoint keeps as per-expert NF4 layers are adopted packed (no dense 3-D
    copy), stacked for the grouped NF4 kernels (so decode keeps its CUDA graphs), and compute what
    their dequantized weights do."""
    from sloth_kernels.nf4 import dequantize_nf4_ref, quantize_nf4_ref
    from sloth_serve.models.moe import Experts
    from sloth_serve.models.weights import build_model, iter_checkpoint

    folder, _ = make_model(tmp_path, "mixtral")
    cfg = ModelConfig.from_folder(folder)
    quantized = {k: quantize_nf4_ref(v) if ".experts." in k else v for k, v in iter_checkpoint(folder)}
    dequantized = {k: v if isinstance(v, torch.Tensor) else dequantize_nf4_ref(v) for k, v in quantized.items()}
    cpu = torch.device("cpu")
    ours = build_model(cfg, iter(quantized.items()), torch.float32, cpu)
    dense = build_model(cfg, iter(dequantized.items()), torch.float32, cpu)
    experts = [m for m in ours.modules() if isinstance(m, Experts)]
    assert len(experts) == 2 and all(e.is_quantized and e.gate_up_proj is None for e in experts)
    assert all(e.grouped is not None for e in experts)
    assert getattr(ours, "supports_cuda_graphs", True) and getattr(dense, "supports_cuda_graphs", True)
    x = torch.randn(9, 64)
    for layer_q, layer_d in zip(ours.model.layers, dense.model.layers, strict=True):
        torch.testing.assert_close(layer_q.mlp(x, None), layer_d.mlp(x, None), rtol=1e-5, atol=1e-5)
