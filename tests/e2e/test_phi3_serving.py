"""A Phi-4-mini-like checkpoint (Phi3ForCausalLM: fused q|k|v and gate|up, partial rotary, longrope)
served over HTTP with a LoRA adapter trained on its fused modules (`--model <folder> --lora`): the
official `openai` client gets transformers' and PEFT's greedy tokens, whole and streamed."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from live_server import LiveServer, launch
from peft import LoraConfig, PeftModel, get_peft_model
from phi3_models import write_phi3
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_TOKENS = 10


def write_adapter(base: Path, folder: Path) -> Path:
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                           target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, Path]]:
    tmp = tmp_path_factory.mktemp("phi3-serving")
    folder = write_phi3(tmp / "phi4-mini", "phi4-mini", dtype=torch.float32)
    adapter = write_adapter(folder, tmp / "adapter")
    server = launch(tmp, "phi4-mini", "--model", str(folder), "--load-format", "safetensors", "--lora",
                    f"tuned={adapter}", "--block-size", "8", "--max-num-batched-tokens", "32", "--no-warmup",
                    "--device", "cpu", "--dtype", "float32", demo_adapter=False)
    try:
        for lora in (None, adapter):  # the references load while the server starts
            reference(folder, lora, [5, 6, 7])
        server.wait_ready()
        yield server, folder, adapter
    finally:
        server.stop()


_models: dict[tuple[Path, Path | None], torch.nn.Module] = {}


@torch.no_grad()
def reference(folder: Path, adapter: Path | None, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' (or PEFT's) greedy tokens and their log-probabilities."""
    model = _models.get((folder, adapter))
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        _models[(folder, adapter)] = model
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


def test_completions_equal_transformers_and_peft(served: tuple[LiveServer, Path, Path]) -> None:
    server, folder, adapter = served
    client = server.client()
    assert {m.id for m in client.models.list().data} == {"phi4-mini", "tuned"}
    tok = AutoTokenizer.from_pretrained(str(folder))
    gen = torch.Generator().manual_seed(2)
    # 70 tokens: past the original context of 64, so every token takes longrope's long factors
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (6, 70)]
    seen: dict[str, list[str]] = {"phi4-mini": [], "tuned": []}
    for model_id, lora in (("phi4-mini", None), ("tuned", adapter)):
        for prompt in prompts:
            tokens, logprobs = reference(folder, lora, prompt)
            r = client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=0, extra_body={"ignore_eos": True, "skip_special_tokens": False})
            choice = r.choices[0]
            assert choice.text == tok.decode(tokens, skip_special_tokens=False), (model_id, len(prompt))
            assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
            assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(choice.logprobs.token_logprobs, logprobs,
                                                                          strict=True))
            seen[model_id].append(choice.text)
    assert seen["tuned"] != seen["phi4-mini"]  # the adapter changes the output


def test_chat_whole_and_streamed_equal_transformers(served: tuple[LiveServer, Path, Path]) -> None:
    server, folder, _ = served
    client = server.client()
    tok = AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "What does json.dumps do with a tuple?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = tok.decode(reference(folder, None, list(prompt))[0], skip_special_tokens=True)
    kwargs = dict(model="phi4-mini", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert whole.choices[0].message.content == expected
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(stream=True, **kwargs) if chunk.choices)  # type: ignore[call-overload]
    assert streamed == expected
