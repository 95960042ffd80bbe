"""A mixture-of-experts model served over HTTP (`--model <folder>` of a tiny random Qwen2-MoE with a
shared expert and the demo tokenizer): the official `openai` client gets transformers' greedy tokens
from completions, and a chat stream equals its whole reply."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import torch
import transformers
from live_server import LiveServer, launch
from transformers import AutoTokenizer

from sloth_serve.loader import DEMO_MODEL

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, torch.nn.Module]]:
    tmp = tmp_path_factory.mktemp("moe-serving")
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3, num_experts=6,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    folder = tmp / "qwen2-moe"
    hf.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (DEMO_MODEL / name).is_file():
            shutil.copy(DEMO_MODEL / name, folder / name)
    server = launch(tmp, "moe", "--model", str(folder), "--load-format", "safetensors", "--dtype", "float32",
                    "--block-size", "8", "--max-num-batched-tokens", "24", "--no-warmup", demo_adapter=False)
    try:
        server.wait_ready()
        yield server, hf
    finally:
        server.stop()


def test_completions_equal_transformers(served: tuple[LiveServer, torch.nn.Module]) -> None:
    server, hf = served
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    prompt = tokenizer.encode("def parse(line): return")
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    r = server.client().completions.create(model="qwen2-moe", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert r.usage is not None and r.usage.completion_tokens == MAX_TOKENS
    assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=False)


def test_chat_stream_equals_its_whole_reply(served: tuple[LiveServer, torch.nn.Module]) -> None:
    client = served[0].client()
    messages = [{"role": "user", "content": "What does json.dumps do with a tuple?"}]
    whole = client.chat.completions.create(model="qwen2-moe", messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    stream = client.chat.completions.create(model="qwen2-moe", messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert whole.choices[0].message.content == text and whole.usage is not None
    assert whole.usage.completion_tokens >= 1
