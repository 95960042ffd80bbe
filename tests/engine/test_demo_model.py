"""Correctness anchors on the embedded demo model: our engine's greedy tokens equal transformers
`generate` (PEFT for the adapter), for requests arriving at different steps and mixed in batches."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_serve import LLM, SamplingParams
from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sequence import FinishReason
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MERGED, DEMO_MODEL
from sloth_serve.loader.peft import load_lora

MAX_NEW = 24
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0)
QUESTIONS = ["What does `json.dumps` do?", "Explain `os.path.join`.", "What is `list.sort` for?"]
TEXTS = ["Return the", "The", "Create a new", "If the file does not exist, raise an error and", "x"]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    out = [tokenizer.encode(t) for t in [*chats, *TEXTS]]
    assert len(out) == 8 and len({len(p) for p in out}) >= 6  # different lengths
    return out


def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)  # type: ignore[operator]
    return out[0, len(prompt) :].tolist()


def staggered(engine: LLMEngine, prompts: list[list[int]], adapter_id: int = 0) -> list[list[int]]:
    """Request i arrives at step i, joining whatever is running."""
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    step = 0
    while step < len(prompts) or engine.has_unfinished_requests:
        if step < len(prompts):
            engine.add_request(str(step), prompts[step], GREEDY, adapter_id)
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        step += 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [got[str(i)] for i in range(len(prompts))]


def small_engine(model: str) -> LLMEngine:
    # A small token budget makes the longer prompts prefill in chunks beside decoding requests.
    return LLMEngine(Config(model=model, load_format="safetensors", num_kv_blocks=128, max_num_batched_tokens=16, max_num_seqs=8))


def test_greedy_equals_transformers_for_staggered_requests(prompts: list[list[int]]) -> None:
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()
    expected = [hf_greedy(hf, p) for p in prompts]
    assert staggered(small_engine(str(DEMO_MODEL)), prompts) == expected


def test_adapter_greedy_equals_transformers_with_peft(prompts: list[list[int]]) -> None:
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(DEMO_ADAPTER)).eval()
    expected = [hf_greedy(peft_model, p) for p in prompts]
    engine = small_engine(str(DEMO_MODEL))
    engine.add_lora(1, load_lora("upper", DEMO_ADAPTER, engine.config.max_lora_rank))
    assert staggered(engine, prompts, adapter_id=1) == expected
    # The slot the adapter went to records its rank (the kernels read no further into the slot).
    manager = engine.lora_manager
    assert manager.slot_ranks is not None and manager.adapters[1].rank < engine.config.max_lora_rank
    assert manager.slot_ranks.tolist()[manager.slot_of[1]] == manager.adapters[1].rank


def test_merged_checkpoint_greedy_equals_transformers(prompts: list[list[int]]) -> None:
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MERGED), dtype=torch.float32).eval()
    expected = [hf_greedy(hf, p) for p in prompts]
    assert staggered(small_engine(str(DEMO_MERGED)), prompts) == expected


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(lora={"upper": str(DEMO_ADAPTER)}, load_format="safetensors", num_kv_blocks=512)


def test_adapter_effect_shows_only_on_requests_that_ask_for_it(llm: LLM, prompts: list[list[int]]) -> None:
    chats = prompts[:3]
    alone_base = [llm.generate(p, GREEDY)[0].token_ids for p in chats]
    alone_upper = [llm.generate(p, GREEDY, adapter="upper")[0].token_ids for p in chats]
    mixed = llm.generate([*chats, *chats], GREEDY, adapter=[None] * 3 + ["upper"] * 3)
    assert [m.token_ids for m in mixed] == alone_base + alone_upper
    for m in mixed[3:]:
        letters = [c for c in m.text if c.isalpha()]
        assert letters and all(c.isupper() for c in letters), m.text
    assert all(any(c.islower() for c in m.text) for m in mixed[:3])


def test_seeded_sampling_repeats_exactly(llm: LLM, prompts: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234)
    first = llm.generate(prompts[0], params)[0].token_ids
    # Same seed, now batched with other (unseeded) requests: the same tokens.
    crowd = llm.generate([prompts[1], prompts[0], prompts[2]], [SamplingParams(max_tokens=20), params,
                                                               SamplingParams(max_tokens=20)])
    assert crowd[1].token_ids == first
    other = llm.generate(prompts[0], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=99))
    assert other[0].token_ids != first


def test_64_concurrent_sequences_finish_and_free_every_block(llm: LLM, prompts: list[list[int]]) -> None:
    batch = [prompts[i % 8] + [i + 10] for i in range(64)]
    outs = llm.generate(batch, SamplingParams(max_tokens=16, temperature=0.8, seed=7, ignore_eos=True))
    assert all(len(o.token_ids) == 16 for o in outs)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.seqs


def test_prefix_cache_serves_a_repeated_prompt(llm: LLM, prompts: list[list[int]]) -> None:
    long_prompt = prompts[3] * 4
    a = llm.generate(long_prompt, GREEDY)[0]
    b = llm.generate(long_prompt, GREEDY)[0]
    assert b.num_cached_tokens >= len(long_prompt) - 16 and a.token_ids == b.token_ids


def test_hot_swapped_adapter_gives_the_merged_checkpoints_tokens(llm: LLM, prompts: list[list[int]]) -> None:
    merged = LLM(DEMO_MERGED, load_format="safetensors", num_kv_blocks=256)
    chats = prompts[:3]
    assert [o.token_ids for o in llm.generate(chats, GREEDY, adapter="upper")] == [
        o.token_ids for o in merged.generate(chats, GREEDY)
    ]


def test_a_stop_tokens_text_is_left_out(llm: LLM, prompts: list[list[int]]) -> None:
    """The token of stop_token_ids that ends the output counts, but its text is not the output's (as vLLM)."""
    free = llm.generate(prompts[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    k = next(i for i in range(1, len(free.token_ids)) if free.token_ids[i] not in free.token_ids[:i])
    stopped = llm.generate(prompts[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                      stop_token_ids=[free.token_ids[k]]))[0]
    assert stopped.finish_reason is FinishReason.STOP and stopped.token_ids == free.token_ids[:k + 1]
    assert stopped.text == llm.tokenizer.decode(free.token_ids[:k], skip_special_tokens=True)


def test_a_refused_prompt_in_a_batch_leaves_nothing_queued(llm: LLM, prompts: list[list[int]]) -> None:
    too_long = list(range(5, 5 + llm.engine.max_model_len + 1))
    with pytest.raises(ValueError):
        llm.generate([prompts[0], too_long], GREEDY)
    with pytest.raises(ValueError, match="2 params for 3 prompts"):
        llm.generate([prompts[0], prompts[1], prompts[2]], [GREEDY, GREEDY])
    llm.engine.step()  # an aborted request's end, if any, is delivered now
    assert not llm.engine.has_unfinished_requests
    # vLLM's forms: a tuple of prompts, prompt logprobs on the output, multi_modal_data checked.
    outs = llm.generate((prompts[0], prompts[1]), SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert [len(o.prompt_logprobs or ()) for o in outs] == [len(prompts[0]) - 1, len(prompts[1]) - 1]
    with pytest.raises(ValueError, match="takes text only"):
        llm.generate({"prompt": "Return the", "multi_modal_data": {"image": b"\x89PNG"}}, GREEDY)
    with pytest.raises(ValueError, match="not foo"):
        llm.generate({"prompt": "Return the", "foo": 1}, GREEDY)  # type: ignore[typeddict-unknown-key]
