"""Adapters' own modules in a step: logits as wide as the widest vocabulary with the narrower rows
padded by -inf (grammar masks included), and decode steps holding such an adapter kept off the CUDA graphs (which carry
only the base's modules) while other steps still replay them."""

from __future__ import annotations

import pytest
import torch
from factories import create_seq
from transformers import AutoTokenizer

from sloth_serve.config import Config
from sloth_serve.engine.grammar import GrammarCompiler
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampler import Sampler
from sloth_serve.engine.sampling_params import SamplingParams, StructuredSpec
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL
from sloth_serve.loader.adapter_modules import AdapterModules, TableCopy
from sloth_serve.loader.peft import LoRAWeights, load_lora
from sloth_serve.models.per_adapter import AdapterGroup, AdapterStep, SlotModules


def test_logits_pad_narrower_rows_with_minus_inf() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 8, generator=g)
    base, wide = torch.randn(10, 8, generator=g), torch.randn(13, 8, generator=g)
    own = SlotModules(None, wide, {}, 13)
    step = AdapterStep([AdapterGroup(own, torch.tensor([1]), torch.tensor([1]))], 13)
    logits = step.logits(hidden, base)
    assert logits.shape == (3, 13)
    for row in (0, 2):  # base rows: the base's logits, then tokens they do not have
        torch.testing.assert_close(logits[row, :10], hidden[row] @ base.T)
        assert torch.isneginf(logits[row, 10:]).all()
    torch.testing.assert_close(logits[1], hidden[1] @ wide.T)


def test_embed_reads_added_ids_from_the_adapters_table_only() -> None:
    table = torch.nn.Embedding(10, 4)
    own = torch.randn(12, 4)
    ids = torch.tensor([3, 11, 9, 3])  # 11 exists only in the adapter's vocabulary
    step = AdapterStep([AdapterGroup(SlotModules(own, None, {}, 12), torch.tensor([1, 3]), None)], 12)
    h = step.embed(table, ids)
    torch.testing.assert_close(h[[0, 2]], table.weight[[3, 9]].detach())
    torch.testing.assert_close(h[[1, 3]], own[[11, 3]])


class RecordingGraphs:
    """Stands in for DecodeGraphs on the CPU: records the decode batches offered to it and
    declines them (as for a batch past its buckets), so the step runs eagerly."""

    max_batch = 8

    def __init__(self) -> None:
        self.offered: list[list[int] | None] = []

    def run(self, **kwargs: object) -> None:
        self.offered.append(kwargs["lora_slots"])  # type: ignore[arg-type]
        return None


class HostEvent:
    """torch.cuda.Event's few methods the replay path calls, for the CPU."""

    def __init__(self, **kwargs: object) -> None:
        pass

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: HostEvent) -> float:
        return 0.0


def test_decode_steps_with_own_modules_skip_the_graphs_others_replay_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    eng = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64, device="cpu"))
    # An adapter whose only change is its final norm (a modules_to_save of ["norm"]).
    norm = AdapterModules(norms={"model.norm": torch.full((256,), 1.5)})
    eng.add_lora(1, LoRAWeights("norm", "-", 8, None, {}, modules=norm))
    eng.add_lora(2, load_lora("upper", DEMO_ADAPTER, 16))
    graphs = RecordingGraphs()
    eng.runner.graphs = graphs  # type: ignore[assignment]
    params = SamplingParams(max_tokens=4, temperature=0)

    def decode_offers(adapter_ids: list[int]) -> int:
        graphs.offered.clear()
        for i, adapter_id in enumerate(adapter_ids):
            eng.add_request(f"{adapter_ids}-{i}", [5, 6, 7], params, adapter_id)
        while eng.has_unfinished_requests:
            eng.step()
        return len(graphs.offered)

    assert decode_offers([0, 2]) == 3  # base and plain LoRA: every decode step offered to a graph
    assert decode_offers([1]) == 0
    assert decode_offers([0, 1, 2]) == 0  # one such adapter in the batch: the whole step is eager


def test_trainable_token_rows_reach_a_tied_lm_head() -> None:
    rows = TableCopy(None, torch.tensor([4]), torch.ones(1, 256))
    resolved = AdapterModules(embed=rows).resolved(tied=True)
    assert resolved.lm_head is not None and resolved.lm_head.indices is rows.indices
    whole = AdapterModules(embed=TableCopy(torch.zeros(10, 256))).resolved(tied=True)
    assert whole.lm_head is None  # a whole-embedding copy leaves the tied lm_head the base's (as PEFT)


def test_grammar_rows_never_take_added_tokens_free_rows_may() -> None:
    """A constrained request batched with an adapter whose vocabulary is wider than the grammar's."""
    sampler = Sampler(torch.device("cpu"))
    sampler.grammar = GrammarCompiler(AutoTokenizer.from_pretrained(str(DEMO_MODEL)), 4096, [2])
    constrained = create_seq(3, max_tokens=8, eos=2, temperature=0, structured=StructuredSpec('{"type": "object"}'))
    free = create_seq(3, max_tokens=8, eos=2, temperature=0)
    logits = torch.zeros(2, 4100)
    logits[:, 4096:] = 100.0  # the added tokens would win anywhere they are allowed
    tokens, _ = sampler(logits, [constrained, free])
    assert tokens[0] < 4096 and tokens[1] >= 4096


def test_a_removed_adapters_device_copy_is_freed_by_the_next_step() -> None:
    eng = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=64, device="cpu"))
    eng.add_lora(1, LoRAWeights("norm", "-", 8, None, {}, modules=AdapterModules(norms={"model.norm": torch.ones(256)})))
    params = SamplingParams(max_tokens=2, temperature=0)
    eng.add_request("a", [5, 6], params, 1)
    while eng.has_unfinished_requests:
        eng.step()
    assert set(eng.runner.slot_modules.resident) == {1}
    eng.remove_lora(1)
    eng.add_request("base", [5, 6], params, 0)  # a step without adapters
    while eng.has_unfinished_requests:
        eng.step()
    assert not eng.runner.slot_modules.resident
