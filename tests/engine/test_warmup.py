"""The startup warmup runs prompts of every shape class through the real engine and leaves nothing
behind: no request, no used or cached KV block, no prefix-cache statistics."""

from __future__ import annotations

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import WARMUP_PROMPT_LENS, LLMEngine, RequestOutput
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_MODEL


def test_warmup_leaves_the_engine_as_it_found_it() -> None:
    engine = LLMEngine(Config(model=str(DEMO_MODEL), device="cpu", load_format="safetensors", max_model_len=1024,
                              num_kv_blocks=256))
    bm = engine.block_manager
    finished: list[RequestOutput] = []
    prompt_steps: list[int] = []
    mixed_steps: list[list[int]] = []  # steps with decodes and a prompt: the new tokens per sequence

    class Recorder:
        def on_step(self, scheduler, batch, outputs, forward_seconds, now) -> None:  # type: ignore[no-untyped-def]
            finished.extend(o for o in outputs if o.finished)
            if batch is not None and batch.num_tokens > len(batch.seqs):
                prompt_steps.append(batch.num_tokens)
                if 1 in batch.num_new_tokens:
                    mixed_steps.append(list(batch.num_new_tokens))

    engine.observer = Recorder()
    seconds = engine.warmup()
    engine.observer = None
    assert seconds > 0
    # Each length alone, then all together in one step, then each arriving while another decodes;
    # every request generated its tokens.
    # Then a burst of 64-token prompts filling one step's token budget (2048: 32 prompts).
    n = len(WARMUP_PROMPT_LENS)
    assert len(finished) == 3 * n + 1 + 32
    decoding = [o for o in finished if o.request_id == "warmup-decoding"]
    assert len(decoding) == 1 and decoding[0].num_output_tokens > n  # it decoded beside every prompt, then ended
    assert [o.num_output_tokens for o in finished if o not in decoding] == [2] * (3 * n + 32)
    assert sorted(prompt_steps[:n]) == sorted(WARMUP_PROMPT_LENS)
    assert prompt_steps[n] == sum(WARMUP_PROMPT_LENS)
    # Beside the decoding request a prompt takes at most --max-prefill-tokens-while-decoding a step,
    # as when serving: the shorter ones whole, the longer ones in chunks.
    bound = engine.scheduler.config.max_prefill_tokens_while_decoding
    assert all(sum(n for n in m if n > 1) <= bound for m in mixed_steps)
    short = [n for n in WARMUP_PROMPT_LENS if n <= bound]
    assert [max(m) for m in mixed_steps][: len(short)] == short and max(map(max, mixed_steps)) == bound
    assert prompt_steps[-1] == 2048
    assert not engine.has_unfinished_requests and not engine.seqs
    assert bm.num_free_blocks == bm.num_blocks and not bm.cached
    assert bm.num_prefix_queries == 0 and bm.enable_prefix_caching
    out = engine.add_request("after", list(range(3, 40)), SamplingParams(max_tokens=3, temperature=0.0))
    assert out is None
    while engine.has_unfinished_requests:
        engine.step()
    assert bm.num_prefix_queries == 37


def test_warmup_skips_prompts_the_cache_cannot_hold() -> None:
    """A small KV cache (low --gpu-memory-utilization, big model): the warmup runs what fits instead
    of refusing to start. (The model's max_model_len is lowered to the cache's 320 tokens.)"""
    engine = LLMEngine(Config(model=str(DEMO_MODEL), device="cpu", load_format="safetensors", num_kv_blocks=20))
    assert engine.max_model_len == 320
    engine.warmup()
    assert not engine.has_unfinished_requests
    assert engine.block_manager.num_free_blocks == 20


def test_warmup_ends_when_a_prompt_cannot_join_the_decoding_request() -> None:
    """A cache of 38 blocks of 8 holds the 300-token prompt only alone: it waits until the decoding
    request (asked for 100,000 tokens) ends at max_model_len, the model's 2048 lowered to the cache's
    304 tokens; then the prompt runs."""
    engine = LLMEngine(Config(model=str(DEMO_MODEL), device="cpu", load_format="safetensors",
                              num_kv_blocks=38, block_size=8, max_num_batched_tokens=304))
    assert engine.max_model_len == 304
    steps = [0]
    step = engine.step

    def counted() -> list[RequestOutput]:
        steps[0] += 1
        assert steps[0] < 2000, "the warmup does not end"
        return step()

    engine.step = counted  # type: ignore[method-assign]
    engine.warmup()
    assert not engine.has_unfinished_requests and not engine.seqs
    assert engine.block_manager.num_free_blocks == 38


def test_warmup_with_an_adapter_runs_every_prompt_through_it() -> None:
    """add_lora warms the LoRA kernels up on CUDA with the first adapter; here (CPU) it is called
    directly: every warmup request uses the adapter, and the engine is left as it was."""
    from sloth_serve.loader import DEMO_ADAPTER
    from sloth_serve.loader.peft import load_lora

    engine = LLMEngine(Config(model=str(DEMO_MODEL), device="cpu", load_format="safetensors", max_model_len=1024,
                              num_kv_blocks=256, max_loras=2))
    engine.add_lora(1, load_lora("upper", DEMO_ADAPTER, engine.config.max_lora_rank))
    used: set[int] = set()
    steps = [0]

    class Recorder:
        def on_step(self, scheduler, batch, outputs, forward_seconds, now) -> None:  # type: ignore[no-untyped-def]
            if batch is not None:
                steps[0] += 1
                used.update(seq.adapter_id for seq in batch.seqs)

    engine.observer = Recorder()
    engine.warmup(adapter_id=1)
    assert steps[0] > len(WARMUP_PROMPT_LENS) and used == {1}
    assert not engine.has_unfinished_requests and not engine.seqs
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert 1 in engine.lora_manager.adapters


def test_warmup_with_one_sequence_slot_does_not_wait_for_the_decoding_request() -> None:
    """--max-num-seqs 1: no prompt can join a decoding request, so the warmup runs no decoding
    request (which would otherwise decode up to max_model_len before the first prompt could start)."""
    engine = LLMEngine(Config(model=str(DEMO_MODEL), device="cpu", load_format="safetensors", max_model_len=1024,
                              num_kv_blocks=256, max_num_seqs=1))
    steps = [0]
    step = engine.step

    def counted() -> list[RequestOutput]:
        steps[0] += 1
        return step()

    engine.step = counted  # type: ignore[method-assign]
    engine.warmup()
    assert steps[0] < 100  # each prompt's one prompt step and one decode step, alone and together
    assert not engine.has_unfinished_requests and not engine.seqs
    assert engine.block_manager.num_free_blocks == 256
