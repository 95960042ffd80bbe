"""GLM (`GlmForCausalLM`) and GLM-4 (`Glm4ForCausalLM`) natively: greedy tokens equal transformers' on
tiny random models (interleaved RoPE on half of each head, q/k/v biases, gate|up fused on disk, GLM-4's
norms after attention and MLP) through chunked prefill, paged decode and a batch; a hot-swapped LoRA
equals PEFT; the config is read with transformers' defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.loras import load_adapter
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.models.config import ModelConfig
from sloth_serve.models.families import route_of
from sloth_serve.models.glm import Glm4DecoderLayer
from sloth_serve.models.layers import LoRALinear

COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.3,
    eos_token_id=1,
    pad_token_id=0,
)
CONFIGS = {"glm": transformers.GlmConfig, "glm4": transformers.Glm4Config}
PROMPT_LENGTHS = (3, 19, 45, 8)


def make_model(tmp: Path, family: str) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = CONFIGS[family](**COMMON)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random biases and norms so that those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp / family
    model.save_pretrained(folder)
    return folder, model


def write_adapter(hf: torch.nn.Module, folder: Path) -> Path:
    """A PEFT LoRA on q/v/o and the fused gate_up_proj / down_proj (what PEFT targets on GLM-4), B random."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    tuned = get_peft_model(
        hf,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
        ),
    )
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    tuned.save_pretrained(str(folder))
    tuned.unload()  # hf as it was, for the base's tokens
    return folder


def peft_greedy(folder: Path, adapter: Path, prompt: list[int], max_tokens: int = 10) -> list[int]:
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    return hf_greedy(PeftModel.from_pretrained(base, str(adapter)).eval(), prompt, max_tokens)


def engine_greedy(
    folder: Path,
    prompts: list[list[int]],
    device: str = "cpu",
    adapter: Path | None = None,
    model_class: type | None = None,
) -> list[list[int]]:
    engine = LLMEngine(
        Config(
            model=str(folder),
            load_format="safetensors",
            num_kv_blocks=64,
            block_size=8,
            max_num_batched_tokens=24,
            device=device,
            dtype="float32",
            cuda_graph_sizes=(1, 2, 4),
        )
    )
    if model_class is not None:
        assert isinstance(engine.runner.model, model_class)
    if adapter is not None:
        engine.add_lora(1, load_adapter(engine, "a", adapter))
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params, adapter_id=1 if adapter else 0)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    assert engine.block_manager.num_free_blocks == 64
    return [got[str(i)] for i in range(len(prompts))]


def hf_greedy(hf: torch.nn.Module, prompt: list[int], max_tokens: int = 10) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_greedy_matches_transformers(tmp_path: Path, family: str, device: str = "cpu") -> None:
    folder, hf = make_model(tmp_path, family)
    cfg = ModelConfig.from_folder(folder)
    assert (cfg.rotary_dim, cfg.rope_interleaved, cfg.qkv_bias, cfg.post_norms) == (
        8,
        True,
        True,
        family == "glm4",
    )
    assert route_of({"architectures": [type(hf).__name__]}).path == "native"
    ps = prompts()
    assert engine_greedy(folder, ps, device) == [hf_greedy(hf, p) for p in ps]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_triton_kernels_and_cuda_graphs_match_transformers(tmp_path: Path, family: str) -> None:
    """The same on CUDA: the Triton RoPE kernel's interleaved layout, decode from CUDA graphs."""
    test_greedy_matches_transformers(tmp_path, family, device="cuda")


def test_glm4_lora_hot_swapped_equals_peft(tmp_path: Path) -> None:
    folder, hf = make_model(tmp_path, "glm4")
    adapter = write_adapter(hf, tmp_path / "adapter")
    ps = prompts()[:2]
    got = engine_greedy(folder, ps, adapter=adapter)
    assert got == [peft_greedy(folder, adapter, p) for p in ps]
    assert got != [hf_greedy(hf, p) for p in ps]


def test_config_defaults_are_transformers(tmp_path: Path) -> None:
    """A config.json with only the architecture takes Glm4Config's defaults (GLM-4-9B-0414's shapes)."""
    cfg = ModelConfig.from_dict({"architectures": ["Glm4ForCausalLM"]})
    ref = transformers.Glm4Config()
    assert (cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps) == (
        ref.hidden_size,
        ref.num_key_value_heads,
        ref.head_dim,
        ref.rms_norm_eps,
    )
    assert cfg.rotary_dim == 64 and cfg.qkv_bias and cfg.post_norms
    with pytest.raises(ValueError, match=r"config.json hidden_act: 'gelu' is not supported for glm4"):
        ModelConfig.from_dict({"architectures": ["Glm4ForCausalLM"], "hidden_act": "gelu"})


def test_glm4_layers_have_their_post_norms(tmp_path: Path) -> None:
    folder, _ = make_model(tmp_path, "glm4")
    from sloth_serve.loader.checkpoint import load_model

    model = load_model(folder, torch.float32, torch.device("cpu"))
    layer = model.model.layers[1]
    assert isinstance(layer, Glm4DecoderLayer)
    assert not torch.equal(layer.post_mlp_layernorm.weight, torch.ones(64))  # read from the checkpoint
    assert isinstance(layer.mlp.gate_up_proj, LoRALinear) and layer.mlp.gate_up_proj.out_slices == [96, 96]
