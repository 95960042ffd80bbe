"""Gemma 2 and Gemma 3 (text, and the text model of a Gemma3ForConditionalGeneration checkpoint) give
transformers' greedy tokens through our engine: tiny random models with every Gemma feature on
(soft-capping, sliding windows shorter than the prompts, local/global layers with their own RoPE,
q/k norm, random norm weights), through chunked prefill and paged decode."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from sloth_serve import LLM
from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.models.config import ModelConfig
from sloth_serve.models.gemma_vision import GemmaVisionForCausalLM, vision_module_name

VOCAB = 4096  # the demo tokenizer's, so that the folders can be served over HTTP too
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.3, eos_token_id=1,
    pad_token_id=0, bos_token_id=2, sliding_window=8, query_pre_attn_scalar=20,
    layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
)
GEMMA2 = dict(TEXT, attn_logit_softcapping=4.0, final_logit_softcapping=6.0, attention_bias=True)
GEMMA3 = dict(TEXT, tie_word_embeddings=False, rope_parameters={
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
})
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
PROMPT_LENS = (3, 19, 45, 8)  # 19 and 45 are longer than the window and than one prefill chunk
MAX_TOKENS = 10


def randomize(model: torch.nn.Module) -> None:
    """Norm weights and biases away from their zero init, so that (1 + w) and the biases matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)


def gemma2_config(**extra: object) -> transformers.Gemma2Config:
    return transformers.Gemma2Config(**{**GEMMA2, **extra})


def gemma3_text_config(**extra: object) -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(**{**GEMMA3, **extra})


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def make_model(tmp: Path, family: str) -> tuple[Path, torch.nn.Module]:
    """A tiny random model of `family` saved under tmp, and the transformers model itself (eager)."""
    torch.manual_seed(0)
    if family == "gemma2":
        model = transformers.Gemma2ForCausalLM(gemma2_config())
    elif family in ("gemma3", "gemma3-legacy-config"):
        model = transformers.Gemma3ForCausalLM(gemma3_text_config())
    else:
        # untied (a tied random model mostly copies its last token): lm_head is language_model.lm_head on disk
        cfg = transformers.Gemma3Config(text_config=gemma3_text_config().to_dict(), vision_config=VISION,
                                        mm_tokens_per_image=4, tie_word_embeddings=False)
        model = transformers.Gemma3ForConditionalGeneration(cfg)
    model = model.eval()
    randomize(model)
    folder = save(model, tmp / family)
    if family == "gemma3-legacy-config":
        legacy_config(folder)
    if family == "gemma3-new-key-layout":
        new_key_layout(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    return folder, ref


def legacy_config(folder: Path) -> None:
    """Rewrite config.json the way published Gemma 3 configs were written before transformers 5:
    rope_theta / rope_scaling (global layers), rope_local_base_freq, sliding_window_pattern."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        cfg.pop(key, None)
    cfg.update(rope_theta=20000.0, rope_local_base_freq=500.0, sliding_window_pattern=3,
               rope_scaling={"rope_type": "linear", "factor": 2.0})
    path.write_text(json.dumps(cfg))


def new_key_layout(folder: Path) -> None:
    """Rename the tensors to the layout transformers 4.5x saved image-text models in
    (model.language_model.*, model.vision_tower.*, lm_head.*)."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model."):]
        elif key.startswith("language_model.lm_head."):
            key = key[len("language_model."):]
        elif key.startswith(("vision_tower.", "multi_modal_projector.")):
            key = "model." + key
        renamed[key] = value.contiguous()
    save_file(renamed, str(path), metadata={"format": "pt"})


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and each one's log-probability (the final soft cap, monotonic,
    never changes a greedy token: the log-probabilities show it)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,  # type: ignore[operator]
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


def engine_greedy(folder: Path, batch: list[list[int]], **settings: object
                  ) -> tuple[LLMEngine, list[tuple[list[int], list[float]]]]:
    """On the CPU (float32, the PyTorch references) unless `settings` say otherwise."""
    engine = LLMEngine(Config(**{"model": str(folder), "load_format": "safetensors", "num_kv_blocks": 64,  # type: ignore[arg-type]
                                 "block_size": 8, "max_num_batched_tokens": 24, "device": "cpu", **settings}))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, params)
    got: dict[str, tuple[list[int], list[float]]] = {str(i): ([], []) for i in range(len(batch))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].extend(lp.logprob for lp in out.new_logprobs)
    return engine, [got[str(i)] for i in range(len(batch))]


FAMILIES = ["gemma2", "gemma3", "gemma3-legacy-config", "gemma3-multimodal", "gemma3-new-key-layout"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(tmp_path: Path, family: str, caplog: pytest.LogCaptureFixture) -> None:
    folder, hf = make_model(tmp_path, family)
    batch = prompts()
    with caplog.at_level(logging.WARNING, logger="sloth_serve.models.weights"):
        engine, got = engine_greedy(folder, batch)
    for i, p in enumerate(batch):
        tokens, logprobs = hf_greedy(hf, p)
        assert got[i][0] == tokens, f"{family} prompt {i}"
        assert got[i][1] == pytest.approx(logprobs, abs=1e-4), f"{family} prompt {i}"
    assert engine.block_manager.num_free_blocks == 64
    if family in ("gemma3-multimodal", "gemma3-new-key-layout"):
        # with a vision_config, the vision tower and projector are served too: every tensor of theirs loaded
        model = engine.loaded.model
        assert isinstance(model, GemmaVisionForCausalLM)
        on_disk = {vision_module_name(k): v for k, v in load_file(str(folder / "model.safetensors")).items()
                   if vision_module_name(k) is not None}
        ours = {n: p for n, p in model.named_parameters() if n.startswith(("vision_tower.", "multi_modal_projector."))}
        assert ours.keys() == on_disk.keys() and all(torch.equal(ours[n], on_disk[n]) for n in ours)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_triton_kernels_and_cuda_graphs_match_transformers(tmp_path: Path, family: str) -> None:
    """The whole forward pass on CUDA (float32, so that greedy choices are stable): Gemma's norm and
    soft-capped, windowed attention kernels, decode steps replayed from CUDA graphs."""
    folder, hf = make_model(tmp_path, family)
    batch = prompts()
    _, got = engine_greedy(folder, batch, device="cuda", dtype="float32", cuda_graph_sizes=(1, 2, 4))
    for i, p in enumerate(batch):
        tokens, logprobs = hf_greedy(hf, p)
        assert got[i][0] == tokens, f"{family} prompt {i}"
        assert got[i][1] == pytest.approx(logprobs, abs=1e-3), f"{family} prompt {i}"


@pytest.mark.parametrize("family", ["gemma2", "gemma3-multimodal"])
def test_lora_adapter_gives_peft_tokens(tmp_path: Path, family: str) -> None:
    """A PEFT LoRA on every attention and MLP projection (of the language model, for the image-text
    checkpoint, whose adapter names them model.language_model.*) and its own copies of Gemma's norms
    (and of the embedding) served hot: PEFT's greedy tokens."""
    folder, hf = make_model(tmp_path, family)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_MODEL / name, folder / name)
    projections = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    targets = rf".*language_model.*\.({projections})" if family == "gemma3-multimodal" else projections.split("|")
    own = (["input_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm", "norm"]
           if family == "gemma2" else ["q_norm", "k_norm", "post_attention_layernorm"])
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=own)
    peft_model = get_peft_model(hf, lora).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    llm = LLM(folder, lora={"a": str(tmp_path / "adapter")}, load_format="safetensors", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=24, device="cpu")
    batch = prompts()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(batch, params, adapter="a")]
    assert ours == [hf_greedy(peft_model, p)[0] for p in batch]
    with peft_model.disable_adapter():  # the adapter changes the output: the test sees it applied
        assert ours != [hf_greedy(peft_model, p)[0] for p in batch]


def test_soft_caps_and_windows_change_the_tokens(tmp_path: Path) -> None:
    """The tiny Gemma 2 above is one where the attention soft cap and the sliding window decide
    tokens and the final soft cap the log-probabilities, so the test above would catch an engine that
    ignored any of them."""
    _, capped = make_model(tmp_path, "gemma2")
    batch = prompts()
    expected = [hf_greedy(capped, p) for p in batch]
    for change in (dict(attn_logit_softcapping=None), dict(layer_types=["full_attention"] * 4),
                   dict(final_logit_softcapping=None)):
        other = transformers.Gemma2ForCausalLM(gemma2_config(**change)).eval()
        other.load_state_dict(capped.state_dict())
        theirs = [hf_greedy(other, p) for p in batch]
        if "final_logit_softcapping" in change:
            assert max(abs(a - b) for (_, x), (_, y) in zip(theirs, expected, strict=True)
                       for a, b in zip(x, y, strict=True)) > 0.1
        else:
            assert [t for t, _ in theirs] != [t for t, _ in expected], change


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sparse_published_configs_take_transformers_defaults(family: str) -> None:
    """Published configs leave most keys out (Gemma 3 4B's text_config names five): every value we
    serve equals what transformers resolves from the same dict."""
    if family == "gemma3":
        raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": {
            "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
        theirs = transformers.Gemma3Config.from_dict(raw).text_config
        local = theirs.rope_parameters["sliding_attention"]
        full = theirs.rope_parameters["full_attention"]
    else:
        raw = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
               "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8}
        theirs = transformers.Gemma2Config.from_dict(raw)
        full = local = theirs.rope_parameters
    ours = ModelConfig.from_dict(raw)
    windows = tuple(theirs.sliding_window if t == "sliding_attention" else None for t in theirs.layer_types)
    assert ours.layer_windows == windows and None in windows and theirs.sliding_window in windows
    assert (ours.vocab_size, ours.head_dim, ours.num_heads, ours.num_kv_heads, ours.max_position_embeddings) == (
        theirs.vocab_size, theirs.head_dim, theirs.num_attention_heads, theirs.num_key_value_heads,
        theirs.max_position_embeddings)
    assert ours.attn_scale == theirs.query_pre_attn_scalar**-0.5
    assert ours.rope_theta == full["rope_theta"] and (ours.local_rope_theta or ours.rope_theta) == local["rope_theta"]
    assert (ours.rope_scaling or {}).get("factor") == full.get("factor")
    assert ours.final_softcap == (theirs.final_logit_softcapping if family == "gemma2" else None)
    assert ours.attn_softcap == (theirs.attn_logit_softcapping if family == "gemma2" else None)
    assert ours.tie_word_embeddings and ours.multimodal == (family == "gemma3")


@pytest.mark.parametrize(("change", "message"), [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
])
def test_configs_we_cannot_serve_exactly_are_refused(change: dict, message: str) -> None:
    raw = {"architectures": ["Gemma3ForCausalLM"], **{k: v for k, v in GEMMA3.items() if k != "rope_parameters"},
           **change}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(raw)
