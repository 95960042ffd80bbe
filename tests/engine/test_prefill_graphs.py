"""Prompt steps replayed from CUDA graphs (server/engine/prefill_graphs.py) give the eager steps'
greedy tokens: prompts alone and together, prompt chunks beside decodes (mixed steps), a prompt
longer than the largest bucket (eager chunks, then a replayed one), with and without adapters."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.prefill_graphs import PrefillGraphs
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL
from sloth_serve.loader.peft import load_lora


def test_prefill_graph_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="--prefill-cuda-graph-sizes takes token counts of at least 2"):
        Config(prefill_cuda_graph_sizes=(16, 1))


def run(engine: LLMEngine, requests: list[tuple[int, list[int], int]], adapters: int = 0) -> dict[str, list[int]]:
    """requests: (arrival step, prompt, max_tokens), greedy; with `adapters`, request i uses adapter
    i % (adapters + 1) (0: the base)."""
    got: dict[str, list[int]] = {}
    pending = sorted(enumerate(requests), key=lambda r: r[1][0])
    step = 0
    while pending or engine.has_unfinished_requests:
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, max_tokens) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                               i % (adapters + 1))
            got[f"r{i}"] = []
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        step += 1
        assert step < 5000
    return got


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("adapters", [0, 1])
def test_replayed_prompt_steps_give_the_eager_tokens(adapters: int) -> None:
    def engine(graphs: bool) -> LLMEngine:
        e = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=512, device="cuda",
                             dtype="float32", max_num_seqs=8, max_num_batched_tokens=256,
                             max_prefill_tokens_while_decoding=48, cuda_graph_sizes=(1, 2, 4, 8),
                             prefill_cuda_graph_sizes=(16, 32, 64, 128) if graphs else (0,),
                             warmup=False))  # (compiles happen in the steps: tokens are what is compared)
        if adapters:
            e.add_lora(1, load_lora("upper", DEMO_ADAPTER, e.config.max_lora_rank))
        return e

    rng = random.Random(3)
    vocab = 4000  # below the demo model's 4,096
    lens = [3, 16, 17, 40, 64, 100, 129, 200, 250, 5, 9]
    reqs = [(rng.randrange(0, 40), [rng.randrange(3, vocab) for _ in range(n)], rng.randrange(2, 20)) for n in lens]
    reqs += [(0, [rng.randrange(3, vocab) for _ in range(n)], 6) for n in (7, 30, 12)]  # together in one step
    eager = engine(False)
    assert eager.runner.prefill_graphs is None
    replayed = engine(True)
    graphs = replayed.runner.prefill_graphs
    assert graphs is not None and graphs.buckets == [16, 32, 64, 128]
    assert {with_lora for _, with_lora in graphs.graphs} == ({False, True} if adapters else {False})
    want, got = run(eager, reqs, adapters), run(replayed, reqs, adapters)
    assert got == want
    assert graphs.num_replays >= 10  # most steps with prompt tokens replayed (the largest chunks did not)


class NoHostSync(TorchDispatchMode):
    """Raises on the operators that read a tensor's data back to the host (a CUDA graph's capture
    fails on them): what runs inside a graph must decide everything on the device. (Boolean-mask
    indexing, which the CPU attention reference uses in place of the CUDA kernels, is let through.)"""

    SYNCS = ("_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.__name__.split(".")[0] in self.SYNCS:
            raise AssertionError(f"{func} reads device data on the host inside a graph")
        return func(*args, **(kwargs or {}))


class ReplayedOnCPU(PrefillGraphs):
    """PrefillGraphs whose "graph" runs the forward pass over the static buffers when replayed, with
    the host lists the CPU attention reference reads taken from them: the packing of a step into a
    bucket (pad tokens, empty sequences, sample index) is what runs, on the CPU, with no host sync
    (NoHostSync)."""

    def _capture(self, t: int, with_lora: bool) -> None:
        s = self.seqs_for(t)
        logits = torch.empty(0)
        graphs = self

        class Replay:
            def replay(self) -> None:
                nonlocal logits
                meta = graphs._meta(t, with_lora)
                meta.attn.query_start_loc_host = graphs.query_start_loc[: s + 1].tolist()
                meta.attn.seq_lens_host = graphs.seq_lens[:s].tolist()
                with NoHostSync():
                    out = graphs.forward(graphs.input_ids[:t], graphs.positions[:t], meta, graphs.sample_index[:s])
                logits.resize_(out.shape).copy_(out)

        self.graphs[(t, with_lora)] = (Replay(), logits)  # type: ignore[assignment]


def test_packing_into_buckets_gives_the_eager_tokens_on_cpu() -> None:
    """With an adapter on every other request: each token's LoRA slot is packed too."""
    def engine(graphs: bool) -> LLMEngine:
        e = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=256, block_size=8,
                             max_num_seqs=6, max_num_batched_tokens=96, max_prefill_tokens_while_decoding=24))
        if graphs:
            r = e.runner
            r.prefill_graphs = ReplayedOnCPU(r._forward_logits_at, [16, 32, 64], 6, 64, 8, r.device)
            r.capture_graphs()
        e.add_lora(1, load_lora("upper", DEMO_ADAPTER, e.config.max_lora_rank))  # LoRA graphs captured too
        return e

    rng = random.Random(5)
    reqs = [(rng.randrange(0, 12), [rng.randrange(3, 4000) for _ in range(n)], rng.randrange(2, 8))
            for n in (3, 16, 17, 30, 70, 9, 2)]
    reqs += [(0, [rng.randrange(3, 4000) for _ in range(n)], 4) for n in (7, 5, 12)]
    replayed = engine(True)
    got = run(replayed, reqs, 1)
    assert got == run(engine(False), reqs, 1)
    assert replayed.runner.prefill_graphs is not None and replayed.runner.prefill_graphs.num_replays >= 5


def test_prompt_bound_beside_decodes_leaves_room_in_the_largest_bucket() -> None:
    from sloth_serve.engine.prefill_graphs import prefill_bound_while_decoding

    assert prefill_bound_while_decoding(None, 64) == 320  # 64 decodes + 320 fill the 384 bucket
    assert prefill_bound_while_decoding(None, 8) == 376
    assert prefill_bound_while_decoding(None, 300) == 192  # never under half the bucket
    assert prefill_bound_while_decoding(100, 64) == 100  # set: as set


def test_adapter_of_rank_over_the_triton_kernels_replays_peft_tokens(tmp_path: Path) -> None:
    """A rank-128 adapter (past the Triton kernels' 64: the reference runs inside the graphs, over
    every slot, reading no slot on the host: NoHostSync) beside the base in replayed prompt steps
    gives PEFT's greedy tokens; the base's rows stay the base's."""
    from tests.loader.peft_adapters import peft_greedy, write_peft_adapter

    folder = write_peft_adapter(tmp_path / "wide", seed=4, r=128, lora_alpha=128,
                                target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    e = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=128, block_size=8,
                         max_num_seqs=4, max_num_batched_tokens=64, max_lora_rank=128, max_loras=2))
    r = e.runner
    r.prefill_graphs = ReplayedOnCPU(r._forward_logits_at, [16, 32, 64], 4, 64, 8, r.device)
    e.add_lora(1, load_lora("wide", folder, 128))
    r.capture_graphs()
    rng = random.Random(8)
    prompts = [[rng.randrange(3, 4000) for _ in range(n)] for n in (5, 21, 9, 14)]
    got = run(e, [(0, p, 6) for p in prompts], adapters=1)  # requests 1 and 3 use the adapter
    assert r.prefill_graphs.num_replays >= 1
    base = [tokens for tokens, _ in peft_greedy(None, prompts, 6)]
    tuned = [tokens for tokens, _ in peft_greedy(folder, prompts[1::2], 6)]
    assert [got["r0"], got["r2"]] == base[0::2]
    assert [got["r1"], got["r3"]] == tuned != base[1::2]  # (the adapter changes them)


def test_lora_graphs_captured_again_leave_none_stale_when_a_capture_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """After MoE expert LoRA tables are made or widened (the old ones freed), the LoRA graphs are
    captured again; the old ones go first, so a capture that fails (out of memory) leaves no graph
    whose replay would read the freed tables: those steps run eagerly. The graphs without LoRA stay."""
    e = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64, block_size=8,
                         max_num_seqs=4, max_num_batched_tokens=64))
    r = e.runner
    r.prefill_graphs = ReplayedOnCPU(r._forward_logits_at, [16, 32], 4, 64, 8, r.device)
    r.capture_graphs()
    e.add_lora(1, load_lora("upper", DEMO_ADAPTER, e.config.max_lora_rank))
    graphs = r.prefill_graphs
    assert set(graphs.graphs) == {(16, False), (32, False), (16, True), (32, True)}
    kept = {key: graph for key, graph in graphs.graphs.items() if not key[1]}
    captured: list[int] = []

    def out_of_memory(t: int, with_lora: bool) -> None:
        captured.append(t)
        if t == 16:
            raise torch.OutOfMemoryError("capture")
        ReplayedOnCPU._capture(graphs, t, with_lora)

    monkeypatch.setattr(graphs, "_capture", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        r.capture_lora_graphs_again()
    assert captured == [32, 16]  # largest first
    assert set(graphs.graphs) == {(16, False), (32, False), (32, True)}  # no stale (16, True)
    assert all(graphs.graphs[key] is graph for key, graph in kept.items())
