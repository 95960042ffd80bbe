"""Adapters with whole modules of their own (PEFT modules_to_save, trainable tokens, a resized
vocabulary), written by PEFT from the demo model: our greedy tokens equal PEFT's, hot-swapped and
merged, alone and in a batch mixed with the base and other adapters."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL
from sloth_serve.loader.peft import load_lora

MAX_NEW = 16
GREEDY = SamplingParams(max_tokens=MAX_NEW, min_tokens=MAX_NEW, temperature=0)  # as min_new_tokens
TEXTS = ["Return the", "The file", "Create a new list and"]
BASE_VOCAB = 4096
ADDED = 4  # tokens the resized adapter adds


def base_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()


def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=MAX_NEW, do_sample=False,  # type: ignore[operator]
                         min_new_tokens=MAX_NEW)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    return [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def frequent(prompts: list[list[int]]) -> list[int]:
    """Tokens the base generates most on these prompts: perturbing them makes an adapter's effect show."""
    hf = base_model()
    counts = Counter(t for p in prompts for t in hf_greedy(hf, p))
    return [t for t, _ in counts.most_common(ADDED)]


def write_adapter(folder: Path, seed: int, resize: int | None = None, **lora: object) -> Path:
    """A PEFT adapter on q_proj/v_proj whose other trained tensors are visibly perturbed."""
    model = base_model()
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM", **lora))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad or "lora_A" in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.02 if "lora_B" in name else p + noise * 0.5 * p.float().std().clamp(min=0.05))
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, frequent: list[int]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = {
        # Unsloth's continued-pretraining layout, with the final and post-attention norms too.
        "modules": write_adapter(root / "modules", 1, modules_to_save=["embed_tokens", "lm_head", "norm"]),
        "embed-only": write_adapter(root / "embed-only", 2, modules_to_save=["embed_tokens"]),
        "tokens": write_adapter(root / "tokens", 3, trainable_token_indices=frequent),
        "resized": write_adapter(root / "resized", 4, resize=BASE_VOCAB + ADDED,
                                 modules_to_save=["embed_tokens", "lm_head"]),
    }
    # The added tokens: rows that outscore the base's favourite tokens, so generation uses them.
    path = out["resized"] / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith("lm_head.weight") or k.endswith("lm_head.modules_to_save.weight")]:
        head = tensors[key]
        head[BASE_VOCAB:] = 1.5 * head[frequent]
    save_file(tensors, str(path), metadata={"format": "pt"})
    return out


def peft_reference(folder: Path, prompts: list[list[int]], vocab: int = BASE_VOCAB) -> list[list[int]]:
    model = base_model()
    if vocab != BASE_VOCAB:
        model.resize_token_embeddings(vocab, mean_resizing=False)  # as PEFT users load it
    peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
    return [hf_greedy(peft_model, p) for p in prompts]


def engine(**settings: object) -> LLMEngine:
    # float32 everywhere (on a GPU too, where decode steps replay CUDA graphs): tokens comparable with PEFT's
    return LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=96, dtype="float32",
                            max_num_batched_tokens=16, max_num_seqs=8, warmup=False, **settings))  # type: ignore[arg-type]


def run(eng: LLMEngine, requests: list[tuple[list[int], int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    """Request i joins at step i (prompts chunked beside decodes); each one's greedy tokens."""
    got: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    step = 0
    while step < len(requests) or eng.has_unfinished_requests:
        if step < len(requests):
            eng.add_request(str(step), requests[step][0], params, requests[step][1])
        for out in eng.step():
            got[out.request_id].extend(out.new_token_ids)
        step += 1
    return [got[str(i)] for i in range(len(requests))]


def test_peft_keys_become_the_adapters_modules(adapters: dict[str, Path]) -> None:
    saved = load_file(str(adapters["modules"] / "adapter_model.safetensors"))
    weights = load_lora("modules", adapters["modules"], 16)
    assert weights.modules is not None and weights.modules.embed is not None and weights.modules.lm_head is not None
    assert torch.equal(weights.modules.embed.weight, saved["base_model.model.model.embed_tokens.weight"])
    assert torch.equal(weights.modules.lm_head.weight, saved["base_model.model.lm_head.weight"])
    # PEFT's "norm" matches every RMSNorm of the demo model (names ending in "norm")
    layer_norms = {f"model.layers.{i}.{n}" for i in range(4) for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(weights.modules.norms) == {"model.norm", *layer_norms}
    assert torch.equal(weights.modules.norms["model.norm"], saved["base_model.model.model.norm.weight"])
    tokens = load_lora("tokens", adapters["tokens"], 16).modules
    assert tokens is not None and tokens.embed is not None and tokens.embed.weight is None
    assert tokens.embed.rows is not None and tokens.embed.rows.shape == (ADDED, 256)


@pytest.mark.parametrize("kind", ["modules", "embed-only", "tokens", "resized"])
def test_greedy_equals_peft_hot_swapped_and_merged(kind: str, adapters: dict[str, Path], prompts: list[list[int]]) -> None:
    folder = adapters[kind]
    vocab = BASE_VOCAB + ADDED if kind == "resized" else BASE_VOCAB
    if kind == "resized":  # a prompt holding an added token, as the adapter's tokenizer writes it
        prompts = [*prompts, [*prompts[0], BASE_VOCAB + 1]]
    expected = peft_reference(folder, prompts, vocab)
    base = [hf_greedy(base_model(), p) for p in prompts if max(p) < BASE_VOCAB]
    assert expected[: len(base)] != base  # the adapter's modules change the tokens
    if kind == "resized":
        assert any(t >= BASE_VOCAB for out in expected for t in out)  # it generates added tokens

    hot = engine()
    hot.add_lora(1, load_lora(kind, folder, 16))
    assert hot.vocab_size(1) == vocab and hot.vocab_size(0) == BASE_VOCAB
    assert run(hot, [(p, 1) for p in prompts]) == expected

    merged = engine(merge_lora=str(folder))
    assert merged.vocab_size() == vocab
    assert run(merged, [(p, 0) for p in prompts]) == expected


def test_mixed_batch_gives_each_request_its_tokens_alone(adapters: dict[str, Path], prompts: list[list[int]]) -> None:
    eng = engine()
    for adapter_id, (name, folder) in enumerate(
            [("modules", adapters["modules"]), ("upper", DEMO_ADAPTER), ("resized", adapters["resized"])], start=1):
        eng.add_lora(adapter_id, load_lora(name, folder, 16))
    requests = [(p, a) for p in prompts for a in (0, 1, 2, 3)]
    alone = [run(eng, [r])[0] for r in requests]
    # Alone, each request gets what transformers (+ PEFT) gives it ...
    references = [[hf_greedy(base_model(), p) for p in prompts], peft_reference(adapters["modules"], prompts),
                  peft_reference(DEMO_ADAPTER, prompts), peft_reference(adapters["resized"], prompts, BASE_VOCAB + ADDED)]
    assert alone == [references[a][i] for i in range(len(prompts)) for a in (0, 1, 2, 3)]
    assert len({tuple(a) for a in alone[:4]}) == 4  # base and three adapters: four different outputs
    # ... and in one batch with the others the same: no adapter's modules reach another's rows.
    assert run(eng, requests) == alone
    assert run(eng, requests[::-1]) == alone[::-1]


def test_steps_run_ahead_feed_added_tokens_back_through_the_adapters_embedding(
        adapters: dict[str, Path], prompts: list[list[int]]) -> None:
    """--async-scheduling: a decode step queued before the host read the previous token embeds that
    token on the device, an added one included."""
    plain = SamplingParams(max_tokens=MAX_NEW, temperature=0)  # min_tokens would keep steps synchronous
    outputs = []
    for ahead in (False, True):
        eng = engine(async_scheduling=ahead)
        eng.add_lora(1, load_lora("resized", adapters["resized"], 16))
        eng.add_lora(2, load_lora("modules", adapters["modules"], 16))
        launched: list[bool] = []
        real = eng.runner.launch_decode

        def watch(batch, prev=None, prev_rows=None):  # type: ignore[no-untyped-def]
            launched.append(prev is not None)  # noqa: B023 (called within this iteration only)
            return real(batch, prev, prev_rows)  # noqa: B023

        eng.runner.launch_decode = watch  # type: ignore[method-assign]
        outputs.append(run(eng, [(p, a) for p in prompts for a in (0, 1, 2)], plain))
        assert sum(launched) >= (MAX_NEW // 2 if ahead else 0)
    assert outputs[1] == outputs[0]
    assert any(t >= BASE_VOCAB for out in outputs[1] for t in out)


def test_added_token_ids_are_valid_for_their_adapter_only(adapters: dict[str, Path]) -> None:
    eng = engine()
    eng.add_lora(1, load_lora("resized", adapters["resized"], 16))
    eng.add_request("ok", [5, BASE_VOCAB + ADDED - 1], GREEDY, 1)
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        eng.add_request("base", [5, BASE_VOCAB], GREEDY, 0)
    with pytest.raises(ValueError, match=r"\[0, 4100\)"):
        eng.add_request("past", [5, BASE_VOCAB + ADDED], GREEDY, 1)


def test_modules_that_cannot_be_served_are_refused_by_name(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "o-proj", 5, modules_to_save=["o_proj"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj.*modules_to_save"):
        load_lora("o-proj", folder, 16)
    # An embedding with added rows but no lm_head to score them: those rows were never saved.
    uneven = write_adapter(tmp_path / "uneven", 6, resize=BASE_VOCAB + ADDED, modules_to_save=["embed_tokens"])
    path = uneven / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "lm_head" not in k and "original_module" not in k},
              str(path))
    eng = engine()
    with pytest.raises(ValueError, match="4100 input and 4096 output tokens"):
        eng.add_lora(1, load_lora("uneven", uneven, 16))
    assert 1 not in eng.lora_manager.adapters
