"""An LFM2 checkpoint (short convolutions + attention, a state slot per running sequence) served over
HTTP with a LoRA adapter on its convolution, attention and feed-forward projections: the official
`openai` client gets transformers' and PEFT's greedy tokens, whole and streamed, from concurrent
requests, and /metrics shows the state slots in use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from family_serving import (
    Servers,
    chat_prompt,
    check_base_and_adapter,
    check_chat,
    metric,
    reference,
    write_random_adapter,
    write_random_model,
)
from live_server import LiveServer
from transformers import AutoTokenizer

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, Path]]:
    tmp = tmp_path_factory.mktemp("lfm2-serving")
    cfg = transformers.Lfm2Config(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, block_multiple_of=16,
                                  layer_types=["conv", "full_attention", "conv"], max_position_embeddings=512,
                                  initializer_range=0.1, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    folder, _ = write_random_model(cfg, tmp / "lfm2", generation_config=True)
    adapter = write_random_adapter(folder, tmp / "adapter", ["q_proj", "v_proj", "out_proj", "in_proj", "w1", "w2"])
    with Servers(tmp) as servers:
        server = servers.launch("lfm2", folder, "--max-num-batched-tokens", "16", "--device", "cpu",
                                "--dtype", "float32", loras={"tuned": adapter})
        servers.ready(lambda: [reference(folder, lora, [5, 6, 7], MAX_TOKENS) for lora in (None, adapter)])
        yield server, folder, adapter


def test_concurrent_completions_equal_transformers_and_peft(served: tuple[LiveServer, Path, Path]) -> None:
    """Base and adapter requests at once, prompts longer than the 16-token budget (chunked prefill)."""
    server, folder, adapter = served
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (6, 37, 2, 23)]
    check_base_and_adapter(server, folder, "lfm2", adapter, prompts, MAX_TOKENS, at_once=True)


def test_chat_streamed_equals_transformers_and_slots_go_back(served: tuple[LiveServer, Path, Path]) -> None:
    server, folder, _ = served
    tok = AutoTokenizer.from_pretrained(str(folder))
    check_chat(server.client(), "lfm2", tok, reference(folder, None, chat_prompt(tok), MAX_TOKENS)[0])
    assert metric(server, "sloth:state_slots_in_use") == 0.0  # every request has ended: its slot is free


def prefix_hits(server: LiveServer) -> float:
    return metric(server, "vllm:prefix_cache_hits_total")


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
        prompt = chat_prompt(tok, messages)
        before = prefix_hits(server)
        r = client.chat.completions.create(model="lfm2", messages=messages, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                           temperature=0, extra_body={"ignore_eos": True})
        expected = tok.decode(reference(folder, None, prompt, MAX_TOKENS)[0], skip_special_tokens=True)
        assert r.choices[0].message.content == expected
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
