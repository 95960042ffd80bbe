"""LoRA on MoE experts equals PEFT: adapters trained with PEFT's `target_parameters` on gpt-oss's and
Qwen3-MoE's 3-D expert weights (as Unsloth trains gpt-oss), hot-swapped per request (beside the base
in one batch) and merged at load (--merge-lora); and adapters with one LoRA module per expert
(transformers 4's layout, Mixtral's w1/w3/w2) equal the base with each expert's B A merged in. The
grouped Triton path (run through TRITON_INTERPRET=1 in a subprocess) gives the expert-by-expert
path's tokens, and PEFT's; steps with expert LoRA on grouped experts may replay the decode graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.lora_manager import LoRAManager
from sloth_serve.engine.loras import load_adapter
from sloth_serve.engine.model_runner import ModelRunner
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader.checkpoint import load_model
from sloth_serve.loader.peft import AdapterError, check_fits, load_lora
from sloth_serve.models.moe import expert_modules

peft = pytest.importorskip("peft")

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.3,
    eos_token_id=1,
)
FAMILIES = {
    "gpt_oss": (
        transformers.GptOssConfig,
        dict(intermediate_size=48, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(
            intermediate_size=96,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=40,
            norm_topk_prob=True,
            head_dim=16,
        ),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        dict(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    ),
}
PROMPTS = [[5, 17, 99, 200, 3], list(range(10, 40))]
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def make_model(tmp: Path, family: str) -> tuple[Path, torch.nn.Module]:
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config_cls(**COMMON, **extra), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("sinks"):
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp / family
    model.save_pretrained(folder)
    return folder, model


def greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=PARAMS.max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def peft_adapter(tmp: Path, hf: torch.nn.Module, **lora: object) -> Path:
    """A PEFT adapter with random B (PEFT starts B at zero) saved under tmp/adapter."""
    torch.manual_seed(3)
    tuned = peft.get_peft_model(hf, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    tuned.save_pretrained(str(tmp / "adapter"))
    return tmp / "adapter"


def peft_greedy(folder: Path, adapter: Path) -> tuple[list[list[int]], list[list[int]]]:
    """PEFT's greedy tokens for PROMPTS with the adapter, and the base's."""
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    tuned = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with_adapter = [greedy(tuned, p) for p in PROMPTS]
    with tuned.disable_adapter():
        return with_adapter, [greedy(tuned, p) for p in PROMPTS]


def engine_greedy(
    folder: Path, adapter: Path | None, merge: bool = False, device: str = "cpu"
) -> dict[str, list[int]]:
    """Every prompt with the adapter and without it, all in one continuous batch (chunked prefill
    beside decodes); with `merge`, the adapter merged into the base and the prompts run on it."""
    engine = LLMEngine(
        Config(
            model=str(folder),
            load_format="safetensors",
            num_kv_blocks=64,
            block_size=8,
            max_num_batched_tokens=24,
            merge_lora=str(adapter) if merge and adapter else None,
            device=device,
            dtype="float32",
            cuda_graph_sizes=(1, 2, 4),
        )
    )
    if adapter is not None and not merge:
        engine.add_lora(1, load_adapter(engine, "a", adapter))
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"base{i}", p, PARAMS)
        if adapter is not None and not merge:
            engine.add_request(f"lora{i}", p, PARAMS, adapter_id=1)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return got


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "mixtral"])
def test_target_parameters_lora_hot_swapped_equals_peft(
    tmp_path: Path, family: str, device: str = "cpu"
) -> None:
    """LoRA on both expert parameters and on q_proj, served per request beside the base: the
    adapter's requests give PEFT's tokens, the base's requests (same batch) transformers'."""
    folder, hf = make_model(tmp_path, family)
    adapter = peft_adapter(
        tmp_path,
        hf,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    want, base = peft_greedy(folder, adapter)
    got = engine_greedy(folder, adapter, device=device)
    assert [got[f"lora{i}"] for i in range(len(PROMPTS))] == want
    assert [got[f"base{i}"] for i in range(len(PROMPTS))] == base
    assert want != base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_target_parameters_lora_hot_swapped_on_gpu(tmp_path: Path, family: str) -> None:
    """The same on CUDA (not yet run on a GPU): the expert LoRA runs in the grouped kernels, decode
    steps holding the adapter replay the CUDA graphs (batch buckets 1, 2, 4) beside the base rows."""
    test_target_parameters_lora_hot_swapped_equals_peft(tmp_path, family, device="cuda")


def test_target_parameters_lora_merged_equals_peft(tmp_path: Path) -> None:
    """--merge-lora of a gpt-oss experts-only adapter (one parameter: the wrapper is not nested)."""
    folder, hf = make_model(tmp_path, "gpt_oss")
    adapter = peft_adapter(tmp_path, hf, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    want, base = peft_greedy(folder, adapter)
    got = engine_greedy(folder, adapter, merge=True)
    assert [got[f"base{i}"] for i in range(len(PROMPTS))] == want != base


def per_expert_adapter(tmp: Path, family: str, hf: torch.nn.Module) -> Path:
    """A LoRA per expert on gate / up / down (Mixtral: w1 / w3 / w2) of layer 1's experts 0 and 2,
    keyed as PEFT saved it for transformers 4's per-expert modules; the same B A is added into
    `hf`'s 3-D expert weights (gate rows, then up rows, of gate_up_proj)."""
    names = (
        {"gate": "w1", "up": "w3", "down": "w2"}
        if family == "mixtral"
        else {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    )
    sparse = "block_sparse_moe" if family == "mixtral" else "mlp"
    experts = hf.model.layers[1].mlp.experts
    inter = experts.down_proj.shape[2]
    hidden = experts.down_proj.shape[1]
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for e in (0, 2):
        for part, name in names.items():
            dim_in, dim_out = (inter, hidden) if part == "down" else (hidden, inter)
            a, b = torch.randn(2, dim_in, generator=gen) * 0.3, torch.randn(dim_out, 2, generator=gen) * 0.3
            key = f"base_model.model.model.layers.1.{sparse}.experts.{e}.{name}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            with torch.no_grad():  # scale alpha / r = 2
                if part == "down":
                    experts.down_proj[e] += 2 * b @ a
                else:
                    rows = slice(0, inter) if part == "gate" else slice(inter, 2 * inter)
                    experts.gate_up_proj[e, rows] += 2 * b @ a
    adapter = tmp / "per-expert"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": list(names.values()),
                "task_type": "CAUSAL_LM",
            }
        )
    )
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return adapter


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_expert_lora_equals_its_merged_weights(tmp_path: Path, family: str) -> None:
    folder, hf = make_model(tmp_path, family)
    base = [greedy(hf, p) for p in PROMPTS]
    adapter = per_expert_adapter(tmp_path, family, hf)
    want = [greedy(hf, p) for p in PROMPTS]
    got = engine_greedy(folder, adapter)
    assert [got[f"lora{i}"] for i in range(len(PROMPTS))] == want != base
    assert [got[f"base{i}"] for i in range(len(PROMPTS))] == base


def test_expert_lora_of_another_shape_is_refused(tmp_path: Path) -> None:
    """An adapter trained on other expert shapes is refused naming the module, before any slot."""
    _, hf = make_model(tmp_path, "qwen3_moe")
    adapter = peft_adapter(tmp_path, hf, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    other, _ = make_model(tmp_path / "other", "gpt_oss")
    model = load_model(other, torch.float32, torch.device("cpu"))
    weights = load_lora("a", adapter, max_rank=16)
    with pytest.raises(
        AdapterError, match=r"does not fit this model: its LoRA on model.layers.0.mlp.experts \(down_proj\)"
    ):
        check_fits(weights, model.lora_layers(), expert_modules(model))
    with pytest.raises(AdapterError, match=r"trains MoE experts at model.layers.0.mlp.experts"):
        check_fits(load_lora("a", adapter, max_rank=16), model.lora_layers(), {})


def test_target_parameters_with_dropout_is_refused(tmp_path: Path) -> None:
    _, hf = make_model(tmp_path, "qwen3_moe")
    adapter = peft_adapter(tmp_path, hf, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "lora_dropout": 0.1}))
    with pytest.raises(AdapterError, match=r"lora_dropout=0.1 is not 0 with target_parameters"):
        load_lora("a", adapter, max_rank=16)


def test_lora_on_4bit_experts_equals_it_on_their_dequantized_weights(tmp_path: Path) -> None:
    """Per-expert NF4 experts (a 4-bit checkpoint's, kept packed): the hot-swapped LoRA adds what it
    adds on their dequantized 16-bit weights, to its slot's tokens only; merging it makes the
    experts 16-bit and computes the same."""
    from sloth_kernels.nf4 import dequantize_nf4_ref, quantize_nf4_ref
    from sloth_serve.loader.expert_adapter import merge_expert_update
    from sloth_serve.models.config import ModelConfig
    from sloth_serve.models.layers import StepMetadata
    from sloth_serve.models.weights import build_model, iter_checkpoint

    folder, hf = make_model(tmp_path, "mixtral")
    adapter = per_expert_adapter(tmp_path, "mixtral", hf)
    cfg = ModelConfig.from_folder(folder)
    quantized = {k: quantize_nf4_ref(v) if ".experts." in k else v for k, v in iter_checkpoint(folder)}
    dequantized = {
        k: v if isinstance(v, torch.Tensor) else dequantize_nf4_ref(v) for k, v in quantized.items()
    }
    cpu = torch.device("cpu")
    ours = build_model(cfg, iter(quantized.items()), torch.float32, cpu)
    dense = build_model(cfg, iter(dequantized.items()), torch.float32, cpu)
    weights = load_lora("a", adapter, max_rank=16)
    check_fits(weights, ours.lora_layers(), expert_modules(ours))
    assert set(weights.experts) == {"model.layers.1.mlp.experts"}
    for model in (ours, dense):
        for name, experts in expert_modules(model).items():
            update = weights.experts.get(name)
            if update:
                experts.lora.install(experts.lora.widened(update, 4, torch.float32, cpu))
            experts.lora.write(2, update)
    meta = StepMetadata(
        attn=None,
        lora_slots=torch.tensor([2] * 5 + [-1] * 4, dtype=torch.int32),  # type: ignore[arg-type]
        active_lora_slots=[2],
    )
    x = torch.randn(9, 64)
    block_q, block_d = ours.model.layers[1].mlp, dense.model.layers[1].mlp
    with_lora = block_d(x, meta)
    torch.testing.assert_close(block_q(x, meta), with_lora, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_lora[5:], block_d(x, None)[5:], rtol=0, atol=0)  # other tokens: the base
    assert not torch.allclose(with_lora[:5], block_d(x, None)[:5], atol=1e-3)
    experts = expert_modules(ours)["model.layers.1.mlp.experts"]
    assert merge_expert_update(experts, weights.experts["model.layers.1.mlp.experts"], torch.float32) > 0
    assert not experts.is_quantized and not experts.quant
    torch.testing.assert_close(block_q(x, None)[:5], with_lora[:5], rtol=1e-5, atol=1e-5)


def test_unsloth_per_expert_gpt_oss_lora_equals_its_merged_weights(tmp_path: Path) -> None:
    """gpt-oss LoRA on Unsloth's per-expert linears (`experts.gate_up_projs.N` [2 inter, hidden] with
    gate|up rows interleaved, `experts.down_projs.N`): each expert's B A, transposed into transformers'
    [in, out] layout, is what the adapter adds."""
    folder, hf = make_model(tmp_path, "gpt_oss")
    base = [greedy(hf, p) for p in PROMPTS]
    experts = hf.model.layers[0].mlp.experts
    hidden, inter = experts.down_proj.shape[2], experts.down_proj.shape[1]
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for e in (1, 3):
        for part, (dim_in, dim_out) in {
            "gate_up_projs": (hidden, 2 * inter),
            "down_projs": (inter, hidden),
        }.items():
            a, b = torch.randn(4, dim_in, generator=gen) * 0.3, torch.randn(dim_out, 4, generator=gen) * 0.3
            key = f"base_model.model.model.layers.0.mlp.experts.{part}.{e}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            with torch.no_grad():  # scale alpha / r = 2
                getattr(experts, part.removesuffix("s"))[e] += 2 * (b @ a).t()
    adapter = tmp_path / "unsloth-gpt-oss"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "target_modules": r".*experts\.(gate_up|down)_projs\.\d+",
                "task_type": "CAUSAL_LM",
            }
        )
    )
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    want = [greedy(hf, p) for p in PROMPTS]
    got = engine_greedy(folder, adapter)
    assert [got[f"lora{i}"] for i in range(len(PROMPTS))] == want != base
    assert [got[f"base{i}"] for i in range(len(PROMPTS))] == base


def test_target_parameters_on_a_linear_weight_is_its_module_lora(tmp_path: Path) -> None:
    """target_parameters naming a linear's 2-D weight (`self_attn.q_proj.weight`) is served as a LoRA on
    that projection, next to expert LoRA on the same adapter: PEFT's tokens."""
    folder, hf = make_model(tmp_path, "qwen3_moe")
    adapter = peft_adapter(
        tmp_path,
        hf,
        target_modules=[],
        target_parameters=["self_attn.q_proj.weight", "mlp.experts.gate_up_proj"],
    )
    want, base = peft_greedy(folder, adapter)
    got = engine_greedy(folder, adapter)
    assert [got[f"lora{i}"] for i in range(len(PROMPTS))] == want != base


# ---- the grouped Triton path (TRITON_INTERPRET=1, in a subprocess) -----------------------------


def _grouped_main(cases: list[str]) -> None:
    """Each (model folder, adapter) pair's engine tokens with the expert LoRA run by the grouped
    kernels (under the interpreter, as on a GPU), and how many grouped LoRA deltas were computed."""
    from sloth_kernels import triton_moe_lora
    from sloth_kernels.triton_interp import patch_interpreter

    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    launches = [0]
    original = triton_moe_lora.grouped_lora_delta

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        launches[0] += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    triton_moe_lora.grouped_lora_delta = counted  # type: ignore[assignment]
    results = {}
    for case in cases:
        folder, adapter = case.split("::")
        launches[0] = 0
        results[case] = {"tokens": engine_greedy(Path(folder), Path(adapter)), "deltas": launches[0]}
    print("RESULTS " + json.dumps(results))


def grouped_greedy(cases: list[tuple[Path, Path]]) -> dict[tuple[Path, Path], dict]:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(root)])))
    args = [f"{folder}::{adapter}" for folder, adapter in cases]
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"grouped run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    got = json.loads(lines[-1][len("RESULTS ") :])
    return {case: got[arg] for case, arg in zip(cases, args, strict=True)}


def test_grouped_expert_lora_gives_the_expert_by_expert_tokens_and_peft(tmp_path: Path) -> None:
    """gpt-oss, Qwen3-MoE and Mixtral with target_parameters LoRA (and q_proj), and Qwen3-MoE with
    per-expert LoRA: the grouped kernels' tokens equal the expert-by-expert path's (this process,
    on the CPU) and PEFT's (or the merged weights'), the base's requests unchanged beside them."""
    cases, want = [], {}
    for family in ("gpt_oss", "qwen3_moe", "mixtral"):
        folder, hf = make_model(tmp_path, family)
        adapter = peft_adapter(tmp_path / family, hf, target_modules=["q_proj"],
                               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        cases.append((folder, adapter))
        want[(folder, adapter)] = peft_greedy(folder, adapter)
    folder, hf = make_model(tmp_path / "per-expert", "qwen3_moe")
    base = [greedy(hf, p) for p in PROMPTS]
    adapter = per_expert_adapter(tmp_path / "per-expert", "qwen3_moe", hf)
    cases.append((folder, adapter))
    want[(folder, adapter)] = ([greedy(hf, p) for p in PROMPTS], base)
    grouped = grouped_greedy(cases)
    for case in cases:
        eager = engine_greedy(*case)
        got = grouped[case]["tokens"]
        assert grouped[case]["deltas"] > 0, f"{case[0].name}: the grouped LoRA kernels never ran"
        assert got == eager, f"{case[0].name}: grouped {got} != expert by expert {eager}"
        with_adapter, without = want[case]
        assert [got[f"lora{i}"] for i in range(len(PROMPTS))] == with_adapter != without
        assert [got[f"base{i}"] for i in range(len(PROMPTS))] == without


def test_expert_lora_on_grouped_experts_keeps_the_decode_graphs(tmp_path: Path) -> None:
    """The runner refuses the graphs only for adapters whose experts run one by one (4-bit experts
    without grouped kernels): their steps read the routing on the host."""
    folder, hf = make_model(tmp_path, "qwen3_moe")
    adapter = peft_adapter(tmp_path, hf, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=16, block_size=8,
                              device="cpu", dtype="float32"))
    engine.add_lora(1, load_adapter(engine, "a", adapter))
    manager = engine.lora_manager
    assert set(manager.adapters[1].experts) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert not manager.needs_eager_experts([1])
    experts = manager.experts["model.layers.1.mlp.experts"]
    experts.gate_up_proj = experts.down_proj = None  # as 4-bit experts quantized unlike one another
    assert not experts.runs_grouped and manager.needs_eager_experts([1])


def test_a_wider_adapter_widens_the_tables_keeping_what_the_slots_hold(tmp_path: Path) -> None:
    """Tables are as wide as the widest adapter so far: a rank-8 adapter on both projections after a
    rank-4 one on down widens down's table and makes gate|up's; the resident rank-4 adapter keeps
    its slot's values, and both give PEFT's tokens in one batch."""
    folder, hf = make_model(tmp_path, "qwen3_moe")
    narrow = peft_adapter(tmp_path / "narrow", hf, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    _, other = make_model(tmp_path / "other", "qwen3_moe")  # PEFT wraps a model once
    wide = peft_adapter(tmp_path / "wide", other, r=8, lora_alpha=16, target_modules=[],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    want, _ = peft_greedy(folder, narrow)
    want_wide, _ = peft_greedy(folder, wide)
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              device="cpu", dtype="float32"))
    engine.add_lora(1, load_adapter(engine, "narrow", narrow))
    manager = engine.lora_manager
    slot = manager.assign_slots({1})[1]
    tables = manager.experts["model.layers.1.mlp.experts"].lora
    assert set(tables.tables) == {"down"} and tables.tables["down"].a.shape[2] == 4
    before = tables.tables["down"].a[slot].clone()
    assert manager.add(2, load_adapter(engine, "wide", wide))
    assert tables.tables["down"].a.shape[2] == tables.tables["gate_up"].a.shape[2] == 8
    assert torch.equal(tables.tables["down"].a[slot, :, :4], before)
    assert tables.tables["down"].ranks[slot] == 4 and tables.tables["gate_up"].ranks[slot] == 0
    assert not manager.add(3, load_adapter(engine, "narrow-again", narrow))  # fits: nothing made
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"narrow{i}", p, PARAMS, adapter_id=1)
        engine.add_request(f"wide{i}", p, PARAMS, adapter_id=2)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [got[f"narrow{i}"] for i in range(len(PROMPTS))] == want
    assert [got[f"wide{i}"] for i in range(len(PROMPTS))] == want_wide != want


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_expert_table_bytes_are_what_the_first_expert_adapter_allocates(
    tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MoE experts' LoRA tables set aside before the KV cache is sized equal what an adapter of
    the slots' rank training every experts module allocates, and come off the KV cache's budget on
    a GPU beside the adapter slots (sized on the CPU with the GPU's free memory given)."""
    folder, hf = make_model(tmp_path, family)
    adapter = peft_adapter(tmp_path, hf, r=8, lora_alpha=16, target_modules=[],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              device="cpu", dtype="float32", max_loras=3, max_lora_rank=8))
    manager = engine.lora_manager
    expected = LoRAManager.expert_table_bytes(manager.experts.values(), 3, 8, 4)
    engine.add_lora(1, load_adapter(engine, "a", adapter))
    made = sum(t.a.nbytes + t.b.nbytes + t.ranks.nbytes
               for module in manager.experts.values() for t in module.lora.tables.values())
    assert len(manager.experts) == 2 and all(len(m.lora.tables) == 2 for m in manager.experts.values())
    assert made == expected > 0

    gib = 2**30
    engine.config = Config(model=str(folder), gpu_memory_utilization=0.5, max_loras=3, max_lora_rank=8)
    engine.device = torch.device("cuda")  # 3 GiB of 4 free, 2 GiB kept free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * gib, 4 * gib))
    model = engine.loaded.model
    per_block = ModelRunner.kv_bytes_per_block(model, engine.config.block_size, engine.dtype)
    slots = LoRAManager.slot_bytes(model.lora_layers().values(), 3, 8, 4)
    assert engine._num_kv_blocks(model, 0) == (gib - slots - expected) // per_block


if __name__ == "__main__":
    _grouped_main(sys.argv[1:])
