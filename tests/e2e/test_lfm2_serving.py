"""An LFM2 checkpoint (short convolutions + attention, a state slot per running sequence) served over
HTTP with a LoRA adapter on its convolution, attention and feed-forward projections: the official
`openai` client gets transformers' and PEFT's greedy tokens, whole and streamed, from concurrent
requests, and /metrics shows the state slots in use."""

from __future__ import annotations

import concurrent.futures
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from live_server import LiveServer, launch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.loader import DEMO_MODEL

MAX_TOKENS = 10
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def write_lfm2(folder: Path) -> Path:
    """A random LFM2 of the demo tokenizer's vocabulary, with that tokenizer beside it."""
    torch.manual_seed(0)
    cfg = transformers.Lfm2Config(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, block_multiple_of=16,
                                  layer_types=["conv", "full_attention", "conv"], max_position_embeddings=512,
                                  initializer_range=0.1, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (DEMO_MODEL / name).is_file():
            shutil.copy(DEMO_MODEL / name, folder / name)
    return folder


def write_adapter(base: Path, folder: Path) -> Path:
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                           target_modules=["q_proj", "v_proj", "out_proj", "in_proj", "w1", "w2"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, Path]]:
    tmp = tmp_path_factory.mktemp("lfm2-serving")
    folder = write_lfm2(tmp / "lfm2")
    adapter = write_adapter(folder, tmp / "adapter")
    server = launch(tmp, "lfm2", "--model", str(folder), "--load-format", "safetensors", "--lora",
                    f"tuned={adapter}", "--block-size", "8", "--max-num-batched-tokens", "16", "--no-warmup",
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
def reference(folder: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    model = _models.get((folder, adapter))
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        _models[(folder, adapter)] = model
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_concurrent_completions_equal_transformers_and_peft(served: tuple[LiveServer, Path, Path]) -> None:
    """Base and adapter requests at once, prompts longer than the 16-token budget (chunked prefill)."""
    server, folder, adapter = served
    client = server.client()
    tok = AutoTokenizer.from_pretrained(str(folder))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (6, 37, 2, 23)]
    jobs = [(model_id, lora, p) for model_id, lora in (("lfm2", None), ("tuned", adapter)) for p in prompts]

    def complete(job: tuple[str, Path | None, list[int]]) -> str:
        r = client.completions.create(model=job[0], prompt=job[2], max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True, "skip_special_tokens": False})
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(complete, jobs))
    for (model_id, lora, prompt), text in zip(jobs, texts, strict=True):
        assert text == tok.decode(reference(folder, lora, prompt), skip_special_tokens=False), (model_id, len(prompt))
    assert texts[: len(prompts)] != texts[len(prompts) :]  # the adapter changes the output


def test_chat_streamed_equals_transformers_and_slots_go_back(served: tuple[LiveServer, Path, Path]) -> None:
    server, folder, _ = served
    client = server.client()
    tok = AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "What does json.dumps do with a tuple?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = tok.decode(reference(folder, None, list(prompt)), skip_special_tokens=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="lfm2", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True}) if chunk.choices)
    assert streamed == expected
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    line = next(ln for ln in metrics.splitlines() if ln.startswith("sloth:state_slots_in_use{"))
    assert float(line.rsplit(" ", 1)[1]) == 0.0  # every request has ended: its slot is free


def prefix_hits(server: LiveServer) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
               if ln.startswith("vllm:prefix_cache_hits_total{"))


def test_second_chat_with_a_system_prompt_hits_its_snapshot(served: tuple[LiveServer, Path, Path]) -> None:
    """The front end tells the engine where the system prompt ends, so the first chat already leaves a
    state snapshot there: the second, with that system prompt and another user turn, restores KV and
    state from a block boundary at or past the system part (the hit counter grows by as many tokens)
    and still gets transformers' tokens."""
    server, folder, _ = served
    client = server.client()
    tok = AutoTokenizer.from_pretrained(str(folder))
    system = {"role": "system", "content": "You are a terse assistant. Answer questions about Python's standard "
                                           "library in one sentence, with an example when it helps."}
    system_len = len(tok.apply_chat_template([system], tokenize=True, return_dict=False))
    prompts, hits = [], []
    for question in ("What does json.dumps do with a tuple?", "How does heapq order equal priorities?"):
        messages = [system, {"role": "user", "content": question}]
        prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        before = prefix_hits(server)
        r = client.chat.completions.create(model="lfm2", messages=messages, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                           temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == tok.decode(reference(folder, None, prompt), skip_special_tokens=True)
        prompts.append(prompt)
        hits.append(prefix_hits(server) - before)
    shared = next(i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b)
    assert hits[0] == 0 and hits[1] % 8 == 0 and system_len // 8 * 8 <= hits[1] <= shared, (hits, system_len, shared)
    # The Responses API's instructions are a system prompt too: its second request hits as well.
    instructions = "Reply as a pirate would, in under ten words, and never mention the sea."
    hits = []
    for question in ("Who are you?", "What time is it?"):
        before = prefix_hits(server)
        client.responses.create(model="lfm2", instructions=instructions, input=question, max_output_tokens=4,
                                temperature=0)
        hits.append(prefix_hits(server) - before)
    assert hits[0] == 0 and hits[1] >= 8, hits
