"""max_model_len against the KV cache's capacity (blocks x block size), settled at start-up: a
sequence of max_model_len tokens must fit the whole cache alone. Before, a cache smaller than
max_model_len cut long generations off silently (finish reason "length" at the cache's size, short of
max_tokens: --num-kv-blocks 48 gave 767 of 1,500 tokens asked for, with max_model_len 2048). Now an
explicit --max-model-len above the cache stops the start-up (as vLLM does); the model's default is
lowered to the cache, with a warning, so that the API's usual context-length 400 applies."""

from __future__ import annotations

import logging

import pytest

from sloth_serve.config import Config, fit_max_model_len, more_blocks_hint
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.request_fit import fit_error
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.engine.sequence import FinishReason
from sloth_serve.llm import LLM
from sloth_serve.loader import DEMO_MODEL

DEMO = {"model": str(DEMO_MODEL), "load_format": "safetensors", "device": "cpu"}  # max_position_embeddings 2048


# --- the rule (no engine) -----------------------------------------------------------------------

@pytest.mark.parametrize("explicit", [True, False])
def test_a_cache_that_holds_max_model_len_keeps_it(explicit: bool) -> None:
    assert fit_max_model_len(768, 48, 16, explicit, "hint") == 768  # exactly the cache's tokens
    assert fit_max_model_len(100, 48, 16, explicit, "hint") == 100


def test_an_explicit_max_model_len_above_the_cache_is_an_error_naming_both_numbers_and_the_flags() -> None:
    with pytest.raises(ValueError) as caught:
        fit_max_model_len(2048, 48, 16, True, more_blocks_hint(2048, 16))
    message = str(caught.value)
    assert "\n" not in message
    assert "--max-model-len 2048" in message and "768 tokens the KV cache can hold (48 blocks of 16)" in message
    assert "lower --max-model-len to 768 or less" in message and "raise --num-kv-blocks to at least 128" in message


def test_the_models_default_above_the_cache_is_lowered_to_it() -> None:
    assert fit_max_model_len(2048, 48, 16, False, "hint") == 768
    assert fit_max_model_len(769, 48, 16, False, "hint") == 768


def test_the_per_request_checks_are_unchanged() -> None:
    assert fit_error(10, 1, 768, 768) is None
    assert "max_model_len is 768" in (fit_error(700, 100, 768, 768) or "")
    assert "KV cache holds only 64" in (fit_error(100, 1, 2048, 64) or "")


# --- the engine: both the server's engine and the offline LLM ------------------------------------

def test_engine_lowers_the_models_default_to_the_cache_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sloth_serve.engine.llm_engine"):
        engine = LLMEngine(Config(**DEMO, num_kv_blocks=48))  # type: ignore[arg-type]
    assert engine.max_model_len == 768 and engine.scheduler.config.max_model_len == 768
    warned = [r.getMessage() for r in caplog.records if "max_model_len lowered" in r.getMessage()]
    assert len(warned) == 1
    assert "from 2048" in warned[0] and "to 768" in warned[0] and "--num-kv-blocks to at least 128" in warned[0]


def test_engine_keeps_a_default_the_cache_holds(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sloth_serve.engine.llm_engine"):
        engine = LLMEngine(Config(**DEMO, num_kv_blocks=128))  # type: ignore[arg-type]
    assert engine.max_model_len == 2048
    assert not [r for r in caplog.records if "max_model_len lowered" in r.getMessage()]


def test_engine_refuses_an_explicit_max_model_len_above_a_cache_sized_from_memory() -> None:
    """--kv-cache-memory-gb (the CPU's) sized the cache: the error names that flag; --num-kv-blocks
    was not given, so only the engine, having sized the cache, can tell."""
    with pytest.raises(ValueError, match=r"--max-model-len 2048 is larger than the \d+ tokens the KV cache can hold"
                                         r".*raise --kv-cache-memory-gb \(now 0\.001\)"):
        LLMEngine(Config(**DEMO, kv_cache_memory_gb=0.001, max_model_len=2048))  # type: ignore[arg-type]


def test_an_explicit_max_model_len_the_cache_holds_is_kept() -> None:
    engine = LLMEngine(Config(**DEMO, num_kv_blocks=8, block_size=8, max_model_len=64))  # type: ignore[arg-type]
    assert engine.max_model_len == 64


def test_offline_llm_runs_every_sequence_to_max_model_len_without_a_cut() -> None:
    """A 32-token cache: max_model_len 32. Sequences asked for far more tokens end at max_model_len,
    each with every token up to it, even when two at once outgrow the cache (one is preempted and
    recomputed); before, a sequence ended wherever it outgrew the cache."""
    llm = LLM(DEMO_MODEL, load_format="safetensors", device="cpu", num_kv_blocks=4, block_size=8)
    assert llm.engine.max_model_len == 32
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [8, 9, 10, 11, 12]], params)
    assert [len(o.prompt_token_ids) + len(o.token_ids) for o in outs] == [32, 32]
    assert all(o.finish_reason is FinishReason.LENGTH for o in outs)
    assert llm.engine.scheduler.num_preemptions > 0  # the two did not fit side by side
    alone = llm.generate([8, 9, 10, 11, 12], params)[0]
    assert alone.token_ids == outs[1].token_ids  # recomputed after its preemption, the same tokens
    with pytest.raises(ValueError, match="max_model_len is 32"):
        llm.generate([1] * 32, params)  # the prompt leaves no room for a token


def test_offline_llm_refuses_an_explicit_max_model_len_above_the_cache() -> None:
    with pytest.raises(ValueError, match="--max-model-len 64 is larger than the 32 tokens"):
        LLM(DEMO_MODEL, load_format="safetensors", device="cpu", num_kv_blocks=4, block_size=8, max_model_len=64)
