"""Every native family, and four families of the generic path (Gemma 4 among them), from a tiny random
checkpoint (the demo tokenizer beside it): greedy tokens equal transformers' through `LLM` for each, and through the
server (the official `openai` client: completions at once, and a chat whose stream says what its
whole reply says) for each family that no other end-to-end test serves. Served elsewhere: the demo
model (Llama), Gemma 2 and Gemma 3's image-text checkpoint (test_gemma_serving), GLM-4, LFM2,
Granite 4 hybrid and Phi-3 (with adapters: their own test_*_serving files), Cohere on the generic
path (test_generic_serving).

The configs are the engine tests' (tests/engine), at the demo tokenizer's vocabulary; the servers
start a few at a time (their loading overlaps), each group once for its tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from family_serving import (
    Servers,
    check_chat_stream_equals_whole,
    check_completions,
    copy_demo_tokenizer,
    reference,
    tests_module,
)
from live_server import LiveServer
from transformers import AutoTokenizer, PretrainedConfig

from sloth_serve import LLM, SamplingParams
from sloth_serve.models.generic import GenericCausalLM

VOCAB = 4096  # the demo tokenizer's
MAX_TOKENS = 6
PROMPT_LENGTHS = (5, 21)  # the longer one in two chunks of 16, past twice the sliding windows of 8

plain = tests_module("test_model_families", "engine")
moe = tests_module("test_moe_families", "engine")
glm = tests_module("test_glm_families", "engine")
layernorm = tests_module("test_layernorm_families", "engine")
exaone4 = tests_module("test_exaone4_family", "engine")
gemma = tests_module("test_gemma_families", "engine")
gpt_oss = tests_module("test_gpt_oss", "engine")
qwen3_5 = tests_module("test_qwen3_5_family", "engine")
lfm2 = tests_module("test_lfm2_family", "engine")
mamba2 = tests_module("test_mamba2_families", "engine")
generic = tests_module("test_generic_path", "engine")
gemma4 = tests_module("test_gemma4_family", "engine")
phi3 = tests_module("phi3_models", "unit")


def from_table(module: Any, table: str, name: str) -> Callable[[], PretrainedConfig]:
    """A config of an engine test's table of (config class, fields beside its COMMON)."""
    def make() -> PretrainedConfig:
        config_class, fields = getattr(module, table)[name]
        return config_class(**{**module.COMMON, **fields, "vocab_size": VOCAB})
    return make


def qwen3_5_config(moe_layers: bool) -> PretrainedConfig:
    fields = {**qwen3_5.COMMON, "vocab_size": VOCAB}
    if not moe_layers:
        return transformers.Qwen3_5TextConfig(**fields)
    del fields["intermediate_size"]
    return transformers.Qwen3_5MoeTextConfig(**fields, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=48)


def lfm2_config(moe_layers: bool) -> PretrainedConfig:
    fields = {**lfm2.COMMON, "vocab_size": VOCAB}
    if not moe_layers:
        return transformers.Lfm2Config(**fields)
    del fields["block_multiple_of"]
    return transformers.Lfm2MoeConfig(**fields, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                                      num_dense_layers=1, routed_scaling_factor=1.5)


# Each native family (SUPPORTED_ARCHITECTURES' text models) by its family name.
NATIVE: dict[str, Callable[[], PretrainedConfig]] = {
    **{name: from_table(plain, "FAMILIES", name) for name in ("llama", "mistral", "qwen2", "qwen3", "smollm3")},
    **{name: from_table(moe, "FAMILIES", name) for name in ("qwen3_moe", "qwen2_moe", "mixtral")},
    "glm": lambda: glm.CONFIGS["glm"](**{**glm.COMMON, "vocab_size": VOCAB}),
    "glm4": lambda: glm.CONFIGS["glm4"](**{**glm.COMMON, "vocab_size": VOCAB}),
    "cohere": from_table(layernorm, "MODELS", "cohere"),
    "stablelm": from_table(layernorm, "MODELS", "stablelm"),
    "exaone4": lambda: transformers.Exaone4Config(**{**exaone4.COMMON, **exaone4.MODELS["hybrid"], "vocab_size": VOCAB}),
    "gemma2": lambda: gemma.gemma2_config(vocab_size=VOCAB),
    "gemma3": lambda: gemma.gemma3_text_config(vocab_size=VOCAB),
    "phi3": lambda: transformers.Phi3Config(**phi3.COMMON, **phi3.SHAPES["phi3-mini"]),
    "gpt_oss": lambda: transformers.GptOssConfig(**gpt_oss.CONFIG),
    "qwen3_5": lambda: qwen3_5_config(moe_layers=False),
    "qwen3_5_moe": lambda: qwen3_5_config(moe_layers=True),
    "lfm2": lambda: lfm2_config(moe_layers=False),
    "lfm2_moe": lambda: lfm2_config(moe_layers=True),
    "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(**{**mamba2.COMMON, **mamba2.GRANITE,
                                                                       "vocab_size": VOCAB}),
    "falcon_h1": lambda: transformers.FalconH1Config(**{**mamba2.COMMON, **mamba2.FALCON, "vocab_size": VOCAB}),
}
# Families with no native model code here: transformers' modules run inside the engine.
GENERIC: dict[str, Callable[[], PretrainedConfig]] = {
    **{name: from_table(generic, "FAMILIES", name) for name in ("granite", "olmo2", "cohere2")},
    # two head dims, KV-shared layers, per-layer inputs, the MoE block beside the MLP
    "gemma4": lambda: gemma4.text_config("moe"),
}
FAMILIES = {**NATIVE, **GENERIC}
# Served over HTTP here: the families no other end-to-end test serves, a few servers at a time.
SERVED_ELSEWHERE = {"llama", "gemma2", "glm4", "lfm2", "granitemoehybrid", "phi3"}
HTTP_GROUPS = [
    ("mistral", "qwen2", "qwen3", "smollm3", "gemma3"),
    ("qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "glm"),
    ("cohere", "stablelm", "exaone4", "qwen3_5", "qwen3_5_moe"),
    ("lfm2_moe", "falcon_h1", "granite", "olmo2", "cohere2"),
    ("gemma4",),
]


def test_every_family_is_listed_and_the_groups_serve_the_rest() -> None:
    from sloth_serve.models.config import SUPPORTED_ARCHITECTURES

    assert set(NATIVE) == set(SUPPORTED_ARCHITECTURES.values())
    served = [name for group in HTTP_GROUPS for name in group]
    assert sorted(served) == sorted(set(FAMILIES) - SERVED_ELSEWHERE)


def randomize(model: torch.nn.Module) -> None:
    """Norms, biases and state decays away from their initial values, routers and experts of a usable
    size (transformers initializes some small or empty), so that every path changes the tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks", "A_log", ".D", "dt_bias")) or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif "experts" in name or name.endswith(".gate.weight"):
                p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0.0, 0.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The family's random checkpoint folder (written once), named after the family: the id the
    server gives it."""
    root = tmp_path_factory.mktemp("families")

    def folder(name: str) -> Path:
        path = root / name
        if not path.is_dir():
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(FAMILIES[name](), attn_implementation="eager")
            randomize(model.eval())
            model.save_pretrained(path)
            copy_demo_tokenizer(path)
        return path

    return folder


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def expected(folder: Path) -> list[tuple[list[int], None]]:
    return [(reference(folder, None, p, MAX_TOKENS)[0], None) for p in prompts()]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_llm_gives_transformers_greedy_tokens(name: str, checkpoint: Callable[[str], Path]) -> None:
    folder = checkpoint(name)
    llm = LLM(folder, load_format="safetensors", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=16)
    assert isinstance(llm.engine.runner.model, GenericCausalLM) == (name in GENERIC)
    outs = llm.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    assert [(out.token_ids, None) for out in outs] == expected(folder)


@pytest.fixture(scope="module", params=HTTP_GROUPS, ids=lambda group: "-".join(group))
def served(request: pytest.FixtureRequest, checkpoint: Callable[[str], Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    """A group's servers, started together while the references load."""
    folders = {name: checkpoint(name) for name in request.param}
    with Servers(tmp_path_factory.mktemp("families-serving")) as servers:
        started = {name: servers.launch(name, folder, "--max-num-batched-tokens", "16", "--num-kv-blocks", "128",
                                        "--device", "cpu", "--dtype", "float32")
                   for name, folder in folders.items()}
        servers.ready(lambda: [expected(folder) for folder in folders.values()])
        yield started


def test_server_gives_transformers_greedy_tokens(served: dict[str, LiveServer], checkpoint: Callable[[str], Path]
                                                 ) -> None:
    for name, server in served.items():
        folder = checkpoint(name)
        check_completions(server.client(), AutoTokenizer.from_pretrained(str(folder)),
                          [(name, p) for p in prompts()], expected(folder), at_once=True)
        check_chat_stream_equals_whole(server.client(), name)
