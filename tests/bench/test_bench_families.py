"""The per-family benchmark models on CPU: each real shape has its published parameter count, and each
shape's tiny twin, written as a pre-quantized NF4 folder by bench/make_random_model.py, loads through
our loader (Unsloth, then adoption) with its linears kept in 4-bit and decodes, so that the GPU run
does not fail on a typo in a shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import make_random_model
from bench.family_shapes import SHAPES, hf_config
from bench.nf4_checkpoint import tensor_specs

# Published sizes (billions of parameters, a tied output projection counted once).
PUBLISHED = {"gemma3-4b": 3.88, "gemma3-12b": 11.77, "phi4-mini": 3.84, "qwen3-8b": 8.19, "qwen3-30b-a3b": 30.53,
             "olmo2-7b": 7.30, "granite3-8b": 8.17, "gpt-oss-20b": 20.91, "lfm2-1.2b": 1.17,
             "qwen3.5-9b": 8.95, "qwen3.5-35b-a3b": 34.66}  # Qwen3.5: transformers' default text configs
REAL = [name for name in SHAPES if not name.startswith("tiny-")]


def params(name: str, layers: int | None = None, nf4_experts: bool = True) -> int:
    shape = SHAPES[name]
    return sum(s.numel for s in tensor_specs(hf_config(shape, layers), shape.skip_modules, nf4_experts))


def test_every_real_shape_has_a_published_size() -> None:
    assert sorted(REAL) == sorted(PUBLISHED)
    for name in REAL:
        assert params(name) / 1e9 == pytest.approx(PUBLISHED[name], abs=0.01), name


def test_layers_option_keeps_the_first_layers_and_expert_layouts_hold_the_same_weights() -> None:
    full, cut = params("qwen3-30b-a3b"), params("qwen3-30b-a3b", layers=12)
    embeddings = 2 * 151936 * 2048 + 2048  # embed_tokens, lm_head, final norm
    assert (cut - embeddings) * 4 == full - embeddings
    assert params("qwen3-30b-a3b", 2, nf4_experts=False) == params("qwen3-30b-a3b", 2)
    with pytest.raises(ValueError, match="between 1 and 48"):
        hf_config(SHAPES["qwen3-30b-a3b"], layers=49)


def test_every_real_shapes_config_is_served_and_parses(tmp_path: Path) -> None:
    """The full-size config.json of each shape (not only its tiny twin) passes the start-up checks:
    a path serves it and, when native, our ModelConfig reads it (longrope factors, layer windows ...)."""
    from sloth_serve.models.config import ModelConfig
    from sloth_serve.models.families import route_of

    for name in REAL:
        hf_config(SHAPES[name]).save_pretrained(tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        if route_of(cfg).path == "native":
            parsed = ModelConfig.from_dict(cfg)
            assert (parsed.num_layers, parsed.vocab_size) == (SHAPES[name].layers, SHAPES[name].vocab), name


def build(tmp: Path, name: str, *extra: str) -> Path:
    out = tmp / name
    rc = make_random_model.main(["--shape", f"tiny-{name}", "--out", str(out), "--device", "cpu", *extra])
    assert rc == 0
    return out


def load_and_decode(folder: Path) -> tuple[torch.nn.Module, list[int]]:
    from sloth_serve import LLM, SamplingParams

    llm = LLM(str(folder), num_kv_blocks=32)
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    return llm.engine.loaded.model, out[0].token_ids


NATIVE = {"gemma3-4b": "GemmaForCausalLM", "phi4-mini": "LlamaForCausalLM", "qwen3-8b": "LlamaForCausalLM",
          "olmo2-7b": "GenericCausalLM", "granite3-8b": "GenericCausalLM", "lfm2-1.2b": "Lfm2ForCausalLM",
          "qwen3.5-9b": "Qwen3_5ForCausalLM", "qwen3.5-35b-a3b": "Qwen3_5ForCausalLM"}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_tiny_family_model_loads_in_4bit_through_our_loader(tmp_path: Path, name: str) -> None:
    folder = build(tmp_path, name)
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"]
    model, tokens = load_and_decode(folder)
    # Native families carry their own class; OLMo 2 and Granite ride the generic path (unless made native).
    assert type(model).__name__ in (NATIVE[name], "LlamaForCausalLM", "GemmaForCausalLM")
    assert sum(getattr(m, "is_quantized", False) for m in model.modules()) >= 2 * 4  # attention + MLP per layer
    assert len(tokens) == 4


def test_tiny_moe_with_16bit_experts_loads_with_4bit_attention(tmp_path: Path) -> None:
    from sloth_serve.models.moe import Experts

    model, tokens = load_and_decode(build(tmp_path, "qwen3-30b-a3b", "--moe-experts", "bf16"))
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert len(experts) == 2 and not any(m.is_quantized for m in experts)
    assert sum(getattr(m, "is_quantized", False) for m in model.modules()) == 2 * 2  # qkv and o per layer
    assert len(tokens) == 4


def test_tiny_moe_with_per_expert_nf4_experts_loads_with_experts_in_nf4(tmp_path: Path) -> None:
    """Unsloth's bnb-4bit MoE layout: transformers 5 merges the experts' packed bytes without their
    quantization state, so our loader reads them from the files (server/loader/nf4_disk.py)."""
    from sloth_serve.models.moe import Experts

    folder = build(tmp_path, "qwen3-30b-a3b")
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "model.layers.1.mlp.experts.7.down_proj.weight.quant_state.bitsandbytes__nf4" in header
    model, tokens = load_and_decode(folder)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert len(experts) == 2 and all(m.is_quantized and len(m.quant) == 3 * m.num_experts for m in experts)
    assert len(tokens) == 4


def test_tiny_gpt_oss_in_transformers_layout_loads_natively(tmp_path: Path) -> None:
    from sloth_serve.models.gpt_oss_experts import GptOssExperts

    folder = build(tmp_path, "gpt-oss-20b")
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["model.layers.0.mlp.experts.gate_up_proj"]["shape"] == [4, 64, 128]  # [E, H, 2I]
    assert "model.layers.0.self_attn.sinks" in header and "model.layers.0.self_attn.q_proj.weight.absmax" in header
    model, tokens = load_and_decode(folder)
    experts = [m for m in model.modules() if isinstance(m, GptOssExperts)]
    assert len(experts) == 2 and not any(m.is_quantized for m in experts)
    assert sum(getattr(m, "is_quantized", False) for m in model.modules()) == 2 * 2  # qkv and o per layer
    assert len(tokens) == 4


# ---------------------------------------------------------------- the per-family run's plan and report


def test_family_specs_parse_layers_and_expert_layout() -> None:
    from bench.families import DEFAULT_FAMILIES, Family

    assert Family.parse("qwen3-30b-a3b:12:bf16") == Family("qwen3-30b-a3b", 12, True)
    assert Family.parse("gemma3-4b").label == "gemma3-4b"
    assert Family.parse("qwen3-30b-a3b:12").label == "qwen3-30b-a3b-12l"
    assert all(Family.parse(f) for f in DEFAULT_FAMILIES.split(","))
    for bad in ("llama9", "qwen3-8b:fp8"):
        with pytest.raises(ValueError):
            Family.parse(bad)


def write_results(out: Path, route: str, ours: dict[int, float], unsloth: dict[int, float]) -> Path:
    out.mkdir(parents=True)
    info = {"family": out.name, "source": "x", "total_layers": 4, "layers": None, "build_s": 3.0, "disk_gb": 1.0,
            "route": route, "route_note": "Arch"}
    (out / "info.json").write_text(json.dumps(info))
    (out / "engine.json").write_text(json.dumps([{"batch": b, "adapters": 0, "output_tok_s": 2 * r}
                                                 for b, r in ours.items()]))
    for b, r in ours.items():
        (out / f"http-c{b}.json").write_text(json.dumps({"metrics": {"output_throughput": r, "failed": 0}}))
    rows = [{"peer": "unsloth-graphs", "batch_size": b, "status": "ok", "tokens_per_s": r} for b, r in unsloth.items()]
    rows.append({"peer": "hf-bnb", "batch_size": 1, "status": "error", "note": "load failed: KeyError: 'x'"})
    (out / "peers.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return out


def test_report_gives_ratios_to_unsloths_best_and_the_issue_targets(tmp_path: Path) -> None:
    from bench.families import parse_args
    from bench.families_report import family_markdown, summary_markdown

    args = parse_args(["--out", str(tmp_path), "--batch-sizes", "1,64"])
    fast = write_results(tmp_path / "fast", "native", {1: 300.0, 64: 9000.0}, {1: 150.0, 64: 5000.0})
    slow = write_results(tmp_path / "slow", "native", {1: 200.0, 64: 9000.0}, {1: 150.0, 64: 5000.0})
    generic = write_results(tmp_path / "gen", "generic", {1: 50.0, 64: 5000.0}, {1: 150.0, 64: 5000.0})
    table = family_markdown(fast, args)
    assert "| sloth-serve engine alone | 600 | 18,000 |" in table
    assert "| HTTP / Unsloth's best | 2.00x | 1.80x |" in table
    assert "| transformers + bitsandbytes NF4 | error | not run |" in table and "KeyError" in table
    for out in (fast, slow, generic):
        (out / "family.md").write_text(family_markdown(out, args))
    summary = summary_markdown([fast, slow, generic], args)
    assert "| fast | native | 300 | 150 | 2.00x | 9,000 | 5,000 | 1.80x | met (>= 1.5x) |" in summary
    assert "| slow | native | 200 | 150 | 1.33x | 9,000 | 5,000 | 1.80x | missed (< 1.5x) |" in summary
    assert "| gen | generic | 50.0 | 150 | 0.33x | 5,000 | 5,000 | 1.00x | met (>= 1x at bs 64) |" in summary
