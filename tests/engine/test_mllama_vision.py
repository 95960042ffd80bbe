"""Llama 3.2 Vision through the offline LLM: a tiny random MllamaForConditionalGeneration gives
transformers' prompt ids and greedy tokens for prompts with images (one image, two images apart and
side by side, text before the first image, a text-only request in the same batch, prefill chunked
over several steps); different images give different outputs; a repeated image comes from the
encoder and prefix caches, another image never from the latter; each sequence's cross-attention keys
and values are projected once (not at every decode step) and freed with its blocks (finish, abort,
preemption)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mllama_models import IMAGE_TOKEN, MAX_TOKENS, chat_text, hf_greedy, make_mllama
from peft import PeftModel
from vision_models import random_image, write_adapter

from sloth_serve.engine.cross_inputs import image_ranges
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.engine.sequence import Sequence
from sloth_serve.llm import LLM
from sloth_serve.loader.adapter_config import AdapterError

LANGUAGE_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return make_mllama(tmp_path_factory.mktemp("mllama") / "model")


@pytest.fixture(scope="module")
def served(model: tuple[Path, Any]) -> tuple[LLM, Any]:
    folder, hf = model
    # 8 tokens a step: prompts are prefilled over several steps, images' rows split between them
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=96, block_size=8,
              max_num_batched_tokens=8, max_loras=2, max_lora_rank=8)
    return llm, hf


def test_image_ranges_follow_transformers_mask() -> None:
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    for offsets, length in (([3], 10), ([2, 6], 12), ([2, 3, 7], 12), ([1, 2, 3], 9), ([0, 4, 5], 9)):
        ids = [9 if i in offsets else 0 for i in range(length)]
        want = get_cross_attention_token_mask(ids, 9)
        got = image_ranges(offsets, length)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [min(e, length) for _, e in got] == [length if e == -1 else e for _, e in want]


def test_images_give_transformers_greedy_tokens(served: tuple[LLM, Any]) -> None:
    llm, hf = served
    tok = llm.tokenizer
    cases: list[tuple[list[str], list[Any]]] = [
        ([IMAGE_TOKEN, "What is this?"], [random_image(1, 30, 20)]),  # 2 tiles side by side
        (["Compare", IMAGE_TOKEN, "with", IMAGE_TOKEN, "please."], [random_image(2, 12, 30), random_image(3, 16, 16)]),
        (["Two at once:", IMAGE_TOKEN, IMAGE_TOKEN, "which?"], [random_image(4), random_image(5, 40, 10)]),
        (["No picture here, only text."], []),
    ]
    prompts: list[Any] = [{"prompt": chat_text(tok, parts), "images": images} if images else chat_text(tok, parts)
                          for parts, images in cases]
    outs = llm.generate(prompts, GREEDY)
    for (parts, images), out in zip(cases, outs, strict=True):
        ids, tokens = hf_greedy(hf, tok, chat_text(tok, parts), images)
        assert out.prompt_token_ids == ids
        assert out.token_ids == tokens, parts


def test_image_content_decides_output_and_caches(served: tuple[LLM, Any]) -> None:
    llm, hf = served
    vision = llm.engine.runner.vision
    assert vision is not None
    text = chat_text(llm.tokenizer, ["Describe the colours in", IMAGE_TOKEN, "in some detail, please."])
    first = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    encoded = vision.num_encoded
    other = llm.generate({"prompt": text, "images": [random_image(11)]}, GREEDY)[0]
    assert other.prompt_token_ids == first.prompt_token_ids
    assert other.token_ids != first.token_ids
    # text before the image attends to it too (transformers): no block of another image's prompt is reused
    assert other.num_cached_tokens == 0
    assert vision.num_encoded == encoded + 1
    again = llm.generate({"prompt": text, "images": [random_image(10)]}, GREEDY)[0]
    assert again.token_ids == first.token_ids == hf_greedy(hf, llm.tokenizer, text, [random_image(10)])[1]
    assert again.num_cached_tokens > 0
    assert vision.num_encoded == encoded + 1


def test_language_lora_per_request_equals_peft(served: tuple[LLM, Any], tmp_path: Path) -> None:
    """LoRA on every language projection, the cross-attention layers' k/v (which run over image
    states) included, beside a base request with the same image: each gives its own model's tokens."""
    llm, hf = served
    adapter = write_adapter(copy.deepcopy(hf), tmp_path / "tuned", LANGUAGE_LAYERS)
    llm.adapters.register("tuned", str(adapter))
    images = [random_image(6, 20, 30)]
    text = chat_text(llm.tokenizer, ["Look:", IMAGE_TOKEN, "what is it?"])
    prompt: Any = {"prompt": text, "images": images}
    tuned, plain, tuned_text = llm.generate([prompt, prompt, chat_text(llm.tokenizer, ["Only text."])], GREEDY,
                                            adapter=["tuned", None, "tuned"])
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    assert tuned.token_ids == hf_greedy(peft, llm.tokenizer, text, images)[1]
    assert plain.token_ids == hf_greedy(hf, llm.tokenizer, text, images)[1] != tuned.token_ids
    assert tuned_text.token_ids == hf_greedy(peft, llm.tokenizer, chat_text(llm.tokenizer, ["Only text."]), [])[1]
    vision = write_adapter(copy.deepcopy(hf), tmp_path / "vision", r".*vision_model\.transformer.*\.(q_proj|v_proj)")
    with pytest.raises(AdapterError, match="vision encoder"):
        llm.adapters.register("vision", str(vision))


def count_kv_projections(llm: LLM) -> list[int]:
    """[calls]: how many times the cross-attention layers' k and v projections have run (both
    counted), kept up to date by forward hooks."""
    calls = [0]
    model: Any = llm.engine.loaded.model
    for idx in model.cross_layers:
        attn = model.text.layers[idx].cross_attn
        for proj in (attn.k_proj, attn.v_proj):
            proj.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cross_kv_is_projected_once_per_sequence(served: tuple[LLM, Any]) -> None:
    """Ten decode steps after a prefill chunked over several steps: the keys and values of each
    cross-attention layer are projected once, at the sequence's first step; the tokens stay
    transformers'. The reserved bytes go back when the sequence finishes."""
    llm, hf = served
    calls = count_kv_projections(llm)
    images = [random_image(20, 24, 16)]
    text = chat_text(llm.tokenizer, ["Tell me about", IMAGE_TOKEN, "in ten tokens."])
    out = llm.generate({"prompt": text, "images": images}, replace(GREEDY, max_tokens=10))[0]
    assert out.token_ids == hf_greedy(hf, llm.tokenizer, text, images, max_tokens=10)[1]
    assert len(out.prompt_token_ids) > 8  # the prefill took more than one step
    assert calls[0] == 2 * len(llm.engine.loaded.model.cross_layers)  # type: ignore[attr-defined]
    budget = llm.engine.block_manager.cross_kv
    assert budget is not None and budget.num_used == 0


def running(llm: LLM, request_id: str) -> Sequence:
    return llm.engine.seqs[request_id]


def test_abort_frees_cross_kv(served: tuple[LLM, Any]) -> None:
    llm, _ = served
    engine, budget = llm.engine, llm.engine.block_manager.cross_kv
    assert budget is not None
    text = chat_text(llm.tokenizer, ["Two:", IMAGE_TOKEN, IMAGE_TOKEN, "go on."])
    ids, mm = llm.encode_prompt({"prompt": text, "images": [random_image(21), random_image(22)]}, None)
    engine.add_request("to-abort", ids, replace(GREEDY, max_tokens=50), mm=mm)
    seq = running(llm, "to-abort")
    engine.step()
    kv = seq.cross_kv
    assert kv is not None and kv.states is None and len(kv.layers) == 2  # every layer's K/V, states dropped
    assert budget.num_used == seq.cross_kv_bytes == 2 * budget.bytes_per_image
    assert engine.abort("to-abort")
    assert seq.cross_kv is None and budget.num_used == 0
    while engine.has_unfinished_requests:
        engine.step()


def test_preempted_sequence_computes_its_cross_kv_again(model: tuple[Path, Any], served: tuple[LLM, Any]) -> None:
    """A KV cache too small for two image prompts to finish side by side: the newer one is preempted
    (its keys and values freed with its blocks) and recomputed later; both give transformers' tokens."""
    folder, hf = model
    tok = served[0].tokenizer
    texts = [chat_text(tok, [IMAGE_TOKEN, words]) for words in ("What is this?", "And this one?")]
    need = [-(-(len(tok.encode(t, add_special_tokens=False)) + 10) // 8) for t in texts]  # blocks by the last token
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=sum(need) - 1, block_size=8)
    calls = count_kv_projections(llm)
    images = [[random_image(31)], [random_image(32, 30, 20)]]
    outs = llm.generate([{"prompt": t, "images": im} for t, im in zip(texts, images, strict=True)],
                        replace(GREEDY, max_tokens=10))
    for text, im, out in zip(texts, images, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, llm.tokenizer, text, im, max_tokens=10)[1]
    num_preemptions = llm.engine.scheduler.num_preemptions
    assert num_preemptions >= 1
    assert calls[0] == 2 * 2 * (2 + num_preemptions)  # each start (first or after preemption): once per layer
    assert llm.engine.block_manager.cross_kv is not None and llm.engine.block_manager.cross_kv.num_used == 0


def decode_step_flops(llm: LLM, num_seqs: int) -> int:
    """The multiply-adds' FLOPs of one decode step of `num_seqs` equal requests with one image each
    (the same prompt and image, so each sequence's share of the step is the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    engine = llm.engine
    text = chat_text(llm.tokenizer, ["Decode after", IMAGE_TOKEN, "please."])
    ids, mm = llm.encode_prompt({"prompt": text, "images": [random_image(40, 20, 30)]}, None)
    names = [f"flops-{num_seqs}-{i}" for i in range(num_seqs)]
    for name in names:
        engine.add_request(name, ids, replace(GREEDY, max_tokens=20), mm=mm)
    seqs = [running(llm, name) for name in names]
    while not all(seq.num_computed_tokens >= seq.num_prompt_tokens and seq.num_output_tokens >= 1 for seq in seqs):
        engine.step()
    assert len({seq.num_computed_tokens for seq in seqs}) == 1  # all decode at the same position
    with FlopCounterMode(display=False) as counter:
        batch = engine.step()
    assert sorted(o.request_id for o in batch) == sorted(names)
    for name in names:
        engine.abort(name)
    while engine.has_unfinished_requests:
        engine.step()
    return counter.get_total_flops()


def test_cross_attention_work_grows_with_the_batch_not_its_square(model: tuple[Path, Any]) -> None:
    """Each sequence's rows attend to its own images' keys and values only: a decode step of four
    sequences with an image each does four times the work of one (attending to every sequence's
    images would make the cross-attention part sixteen times)."""
    # the four prompts prefilled in one step, so that they decode at the same position
    llm = LLM(model[0], load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=256)
    one, four = decode_step_flops(llm, 1), decode_step_flops(llm, 4)
    assert one > 0 and four == 4 * one


def test_prompt_logprobs_score_the_image_token_without_failing(served: tuple[LLM, Any]) -> None:
    """<|image|> lies past the logits (the model never predicts it): a request for prompt logprobs
    scores it -inf, ranked after every token, and every other prompt token as transformers does (its
    gather went past the logits: the request failed, on a GPU a device-side assert)."""
    import torch
    from mllama_models import processor

    llm, hf = served
    engine = llm.engine
    images = [random_image(40, 20, 30)]
    text = chat_text(llm.tokenizer, ["Look at", IMAGE_TOKEN, "and describe it."])
    ids, mm = llm.encode_prompt({"prompt": text, "images": images}, None)
    engine.add_request("scored", ids, replace(GREEDY, max_tokens=1, prompt_logprobs=2), mm=mm)
    seq = running(llm, "scored")
    while engine.has_unfinished_requests:
        engine.step()
    assert seq.finish_reason is not None and seq.finish_reason.name == "LENGTH"
    inputs = processor(llm.tokenizer)(text=text, images=[images], return_tensors="pt", add_special_tokens=False)
    assert inputs["input_ids"][0].tolist() == ids
    with torch.no_grad():
        want = torch.log_softmax(hf(**inputs).logits[0].float(), dim=-1)
    vocab = want.shape[-1]
    image = ids.index(hf.config.image_token_index)
    scored = seq.prompt_logprobs  # entry j scores prompt token j + 1
    assert len(scored) == len(ids) - 1
    for j, lp in enumerate(scored):
        assert lp.token_id == ids[j + 1]
        if j + 1 == image:
            assert lp.logprob == float("-inf") and lp.rank == vocab + 1
        else:
            assert lp.logprob == pytest.approx(want[j, ids[j + 1]].item(), abs=1e-4)
            assert lp.rank == int((want[j] > want[j, ids[j + 1]]).sum()) + 1


def test_repetition_penalty_with_an_image(served: tuple[LLM, Any]) -> None:
    """A repetition penalty reads the prompt's tokens, <|image|> among them, which has no logit: it
    is left out (it was looked up past the logits: the request failed, on a GPU a device-side
    assert); the tokens are transformers' under the same penalty on the prompt's other tokens."""
    import torch
    from mllama_models import processor
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    llm, hf = served
    images = [random_image(41, 30, 20)]
    text = chat_text(llm.tokenizer, [IMAGE_TOKEN, "Say something, and then say it again."])
    out = llm.generate({"prompt": text, "images": images}, replace(GREEDY, repetition_penalty=1.5))[0]
    assert out.finish_reason is not None and out.finish_reason.name == "LENGTH"

    penalty = RepetitionPenaltyLogitsProcessor(1.5)

    def on_text_tokens(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # <|image|> stands in as the prompt's first token, seen already: the same tokens are penalized
        ids = torch.where(input_ids < scores.shape[-1], input_ids, input_ids[:, :1])
        return penalty(ids, scores)  # type: ignore[no-any-return]

    inputs = processor(llm.tokenizer)(text=text, images=[images], return_tensors="pt", add_special_tokens=False)
    want = hf.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                       logits_processor=LogitsProcessorList([on_text_tokens]))
    assert out.token_ids == want[0, inputs["input_ids"].shape[1] :].tolist()
    assert out.token_ids != hf_greedy(hf, llm.tokenizer, text, images)[1]  # the penalty changes them


def test_draft_model_speculation_with_an_image(model: tuple[Path, Any]) -> None:
    """A draft model (text only, the text vocabulary) is fed the sequence's tokens, <|image|> among
    them, which it has no embedding for: it is given another token (the target verifies every
    proposal), where the draft's embedding lookup failed and ended the engine (also on CPUs)."""
    from sloth_serve.loader import DEMO_MODEL

    folder, hf = model
    llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
              speculative_model=str(DEMO_MODEL), num_speculative_tokens=2)
    images = [random_image(42, 16, 30)]
    text = chat_text(llm.tokenizer, ["Look:", IMAGE_TOKEN, "what is it?"])
    out = llm.generate({"prompt": text, "images": images}, GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, llm.tokenizer, text, images)[1]
    assert llm.engine.scheduler.spec_stats.num_draft_tokens > 0
