"""Prompt logprobs (echo + logprobs, prompt_logprobs) come from the prefill itself and equal
transformers' log_softmax of its forward logits on the same prompt: for a prompt prefilled in chunks,
for the same prompt again (which would hit the prefix cache), with max_tokens 0 and under an adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_serve import SamplingParams
from sloth_serve.config import Config
from sloth_serve.engine import sampler
from sloth_serve.engine.llm_engine import LLMEngine, RequestOutput
from sloth_serve.engine.sequence import TokenLogprob
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL
from sloth_serve.loader.peft import load_lora

BUDGET = 8  # --max-num-batched-tokens: longer prompts prefill in chunks
TOP = 3


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    long = tok.encode("If the file does not exist, raise an error and tell the caller which path was missing, "
                      "then return the default configuration.")
    short = tok.encode("Return the")
    assert len(long) > 2 * BUDGET and len(short) < BUDGET
    return [long, short]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=128,
                            max_num_batched_tokens=BUDGET, max_num_seqs=8, enable_prefix_caching=True))


def reference(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """float32 [len - 1, vocab]: row j is the log-distribution of token j + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()  # type: ignore[operator]
    return torch.log_softmax(logits, dim=-1)[:-1]


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
        adapter_id: int = 0) -> dict[str, list[RequestOutput]]:
    got: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params, adapter_id)
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].append(out)
    return got


def assert_matches(scored: list[TokenLogprob] | None, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    assert scored is not None and len(scored) == len(prompt) - 1
    for j, lp in enumerate(scored):
        row, target = ref[j], prompt[j + 1]
        assert lp.token_id == target
        assert lp.logprob == pytest.approx(row[target].item(), abs=1e-4)
        assert lp.rank == int((row > row[target]).sum()) + 1
        assert len(lp.top) == k
        top_vals = row.topk(k).values.tolist()
        for (token, value), want in zip(lp.top, top_vals, strict=True):
            assert value == pytest.approx(want, abs=1e-4)
            assert row[token].item() == pytest.approx(value, abs=1e-4)  # the token it names has that logprob


def test_prompt_logprobs_equal_transformers_chunked_and_cached(engine: LLMEngine, prompts: list[list[int]]) -> None:
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()
    refs = [reference(hf, p) for p in prompts]
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=TOP, ignore_eos=True)
    plain = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    first = run(engine, {"long": (prompts[0], params), "short": (prompts[1], params), "none": (prompts[1], plain)})
    for rid, prompt, ref in (("long", prompts[0], refs[0]), ("short", prompts[1], refs[1])):
        outs = first[rid]
        assert_matches(outs[0].prompt_logprobs, prompt, ref, TOP)
        assert all(o.prompt_logprobs is None for o in outs[1:])  # only the first output carries them
        assert sum(len(o.new_token_ids) for o in outs) == 3
    assert all(o.prompt_logprobs is None for o in first["none"])
    # The same prompt again: its blocks are cached now, but a scored prompt computes every position.
    again = run(engine, {"again": (prompts[0], params)})["again"]
    assert again[0].num_cached_tokens == 0
    assert_matches(again[0].prompt_logprobs, prompts[0], refs[0], TOP)
    # Without prompt logprobs the cache is used (the check above is not vacuous).
    cached = run(engine, {"cached": (prompts[0], plain)})["cached"]
    assert cached[0].num_cached_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_tokens_zero_scores_the_prompt_without_generating(engine: LLMEngine, prompts: list[list[int]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler, "_PROMPT_ROWS_PER_PASS", 3)  # a chunk's scored rows in several passes
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0)
    outs = run(engine, {"score": (prompts[0], params)})["score"]
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "length"
    assert outs[0].new_token_ids == [] and outs[0].num_output_tokens == 0
    assert_matches(outs[0].prompt_logprobs, prompts[0], reference(hf, prompts[0]), 0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)  # generating nothing and scoring nothing is not a request


def test_prompt_logprobs_under_an_adapter_equal_peft(engine: LLMEngine, prompts: list[list[int]]) -> None:
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(DEMO_ADAPTER)).eval()
    if 1 not in engine.lora_manager.adapters:
        engine.add_lora(1, load_lora("upper", DEMO_ADAPTER, engine.config.max_lora_rank))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    outs = run(engine, {"lora": (prompts[0], params)}, adapter_id=1)["lora"]
    assert_matches(outs[0].prompt_logprobs, prompts[0], reference(peft_model, prompts[0]), 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prompt_logprobs_on_cuda_with_graphs_equal_transformers(prompts: list[list[int]]) -> None:
    """The same on CUDA in float32, decode steps replayed from CUDA graphs beside scored prefills."""
    cuda = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=128, device="cuda",
                            dtype="float32", max_num_batched_tokens=BUDGET, max_num_seqs=8, cuda_graph_sizes=(1, 2, 4)))
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=TOP, ignore_eos=True)
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    got = run(cuda, {"decoding": (prompts[1], plain), "long": (prompts[0], params), "short": (prompts[1], params)})
    assert_matches(got["long"][0].prompt_logprobs, prompts[0], reference(hf, prompts[0]), TOP)
    assert_matches(got["short"][0].prompt_logprobs, prompts[1], reference(hf, prompts[1]), TOP)
