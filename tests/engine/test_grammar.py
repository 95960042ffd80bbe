"""Grammar masks in the sampler: the bitmask unpacks exactly, a constrained sequence never samples a
token its grammar forbids (whatever the logits and sampling settings), EOS comes only when the
grammar is complete, free sequences in the same batch keep their tokens, and a bad schema is an
error that names the problem."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from factories import create_seq
from transformers import AutoTokenizer

from sloth_serve.engine.failures import SequenceError
from sloth_serve.engine.grammar import GrammarCompiler, GrammarError, allowed_tokens, bitmask_width
from sloth_serve.engine.sampler import Sampler
from sloth_serve.engine.sampling_params import SamplingParams, StructuredSpec
from sloth_serve.engine.sequence import Sequence
from sloth_serve.loader import DEMO_MODEL

VOCAB = 4096
EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["a", "bb"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["id", "kind", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:  # type: ignore[no-untyped-def]
    return GrammarCompiler(tokenizer, VOCAB, [EOS])


def make_sampler(compiler: GrammarCompiler) -> Sampler:
    sampler = Sampler(torch.device("cpu"))
    sampler.grammar = compiler
    return sampler


def constrained_seq(**params: object) -> Sequence:
    return create_seq(3, max_tokens=64, eos=EOS, structured=StructuredSpec(json.dumps(SCHEMA)), **params)


def test_bitmask_unpacks_like_a_bit_by_bit_reference() -> None:
    for vocab in (1, 31, 33, 100, VOCAB):
        bitmask = torch.randint(-(2**31), 2**31 - 1, (3, bitmask_width(vocab)), dtype=torch.int32)
        expected = torch.tensor(
            [[(int(bitmask[b, t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)] for b in range(3)]
        )
        assert torch.equal(allowed_tokens(bitmask, vocab), expected)


@pytest.mark.parametrize(
    "params",
    [{"temperature": 1.0}, {"temperature": 0.0}, {"temperature": 1.5, "top_k": 5}, {"top_p": 0.5, "seed": 3},
     {"min_p": 0.2, "logit_bias": {EOS: 100.0, 93: 100.0}}, {"repetition_penalty": 1.3, "frequency_penalty": 1.0}],
)  # fmt: skip
def test_constrained_sequence_never_samples_a_masked_token(
    compiler: GrammarCompiler, tokenizer, params: dict  # type: ignore[no-untyped-def]
) -> None:
    """Decode with logits that favour forbidden tokens by far; every token must still be one the
    grammar allows (checked by a separate matcher), and each finished output validates."""
    sampler = make_sampler(compiler)
    seqs = [constrained_seq(**params) for _ in range(8)]
    checkers = {s.request_id: compiler.compile(s.params.structured).deep_copy() for s in seqs}  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        running = [s for s in seqs if not s.is_finished]
        if not running:
            break
        logits = torch.randn(len(running), VOCAB, generator=gen) * 3
        for i, seq in enumerate(running):
            bias = bytearray(checkers[seq.request_id].compute_logit_bias())  # one byte a token: 0 = forbidden
            allowed = torch.frombuffer(bias, dtype=torch.uint8)[:VOCAB] != 0
            logits[i, allowed] -= 50.0  # the model "wants" a forbidden token
        tokens, _ = sampler(logits, running)
        for seq, token in zip(running, tokens.tolist(), strict=True):
            assert checkers[seq.request_id].consume_token(token), (seq.output_token_ids, token)
            seq.append_token(token)
            if token == EOS:
                seq.status = seq.status.FINISHED
    for seq in seqs:
        if seq.is_finished:
            jsonschema.validate(json.loads(tokenizer.decode(seq.output_token_ids[:-1])), SCHEMA)
    assert any(seq.is_finished for seq in seqs)


def test_eos_is_allowed_exactly_when_the_grammar_is_complete(compiler: GrammarCompiler, tokenizer) -> None:  # type: ignore[no-untyped-def]
    sampler = make_sampler(compiler)
    seq = constrained_seq()
    doc = tokenizer.encode('{"id": 7, "kind": "a", "tags": []}', add_special_tokens=False)
    for token in doc:
        allowed = sampler._allowed([seq], VOCAB)
        assert allowed is not None and allowed[0, token] and not allowed[0, EOS]
        seq.append_token(token)
    allowed = sampler._allowed([seq], VOCAB)
    assert allowed is not None and allowed[0].nonzero().flatten().tolist() == [EOS]


def test_a_recomputed_sequence_is_not_fed_twice(compiler: GrammarCompiler, tokenizer) -> None:  # type: ignore[no-untyped-def]
    sampler = make_sampler(compiler)
    seq = constrained_seq()
    for token in tokenizer.encode('{"id": 1', add_special_tokens=False):
        seq.append_token(token)
    first = sampler._allowed([seq], VOCAB)
    seq.num_computed_tokens = 0  # preempted: recomputed from its tokens, which it keeps
    assert torch.equal(sampler._allowed([seq], VOCAB), first)  # type: ignore[arg-type]
    sampler.release(seq.request_id)
    assert len(sampler.matchers) == 0


def test_free_sequences_keep_their_tokens_beside_constrained_ones(compiler: GrammarCompiler) -> None:
    def run(with_constrained: bool) -> list[list[int]]:
        sampler = make_sampler(compiler)
        free = [create_seq(3, max_tokens=64, temperature=0.0), create_seq(3, max_tokens=64, seed=11)]
        batch = [constrained_seq(), free[0], constrained_seq(seed=5), free[1]] if with_constrained else free
        gen = torch.Generator().manual_seed(1)
        out: list[list[int]] = [[], []]
        for _ in range(12):
            logits = torch.randn(1, VOCAB, generator=gen).expand(len(batch), -1).clone()
            tokens = sampler(logits, batch)[0].tolist()
            for seq, token in zip(batch, tokens, strict=True):
                seq.append_token(token)
            for j, seq in enumerate(free):
                out[j].append(seq.token_ids[-1])
        return out

    assert run(True) == run(False)


def test_an_impossible_grammar_fails_only_its_own_request(compiler: GrammarCompiler) -> None:
    """The sampler names the request (the engine fails it and runs the step again without it)."""
    sampler = make_sampler(compiler)
    bad = create_seq(3, eos=EOS, structured=StructuredSpec('{"type": "objekt"}'))  # not compiled by an API
    free = create_seq(3, temperature=0.0)
    logits = torch.randn(2, VOCAB)
    with pytest.raises(SequenceError) as failed:
        sampler(logits.clone(), [bad, free])
    assert list(failed.value.failures) == [bad.request_id] and "objekt" in failed.value.failures[bad.request_id]
    sampler.release(bad.request_id)
    assert sampler(logits[1:].clone(), [free])[0].tolist() == [int(logits[1].argmax())]


def test_bad_schema_is_an_error_that_names_the_problem(compiler: GrammarCompiler) -> None:
    for schema, words in [({"type": "objekt"}, "objekt"), ({"type": "array", "uniqueItems": True}, "uniqueItems"),
                          ({"type": "string", "pattern": "(("}, "unclosed")]:
        with pytest.raises(GrammarError, match=words):
            compiler.compile(StructuredSpec(json.dumps(schema)))


def test_structured_output_cannot_ignore_eos() -> None:
    for extra in ({"ignore_eos": True}, {"min_tokens": 2}):
        with pytest.raises(ValueError, match="structured output"):
            SamplingParams(structured=StructuredSpec.json_object(), **extra)  # type: ignore[arg-type]


def test_a_tokenizer_with_ids_past_the_logits_masks_as_without_them(compiler: GrammarCompiler) -> None:
    """Llama 3.2 Vision's tokenizer holds <|image|> one past its logits: the grammar reads the whole
    tokenizer, the mask has the logits' width and allows what it allows without that token."""
    wider = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    wider.add_special_tokens({"additional_special_tokens": ["<|image|>"]}, replace_extra_special_tokens=False)
    assert len(wider) == VOCAB + 1
    plain, extra = make_sampler(compiler), make_sampler(GrammarCompiler(wider, VOCAB, [EOS]))
    seqs = [constrained_seq(), constrained_seq()]
    for token in wider.encode('{"id": 12, "kind": "bb", "tags": ["x"]}', add_special_tokens=False):
        want, got = plain._allowed([seqs[0]], VOCAB), extra._allowed([seqs[1]], VOCAB)
        assert want is not None and got is not None and got.shape == (1, VOCAB) and torch.equal(got, want)
        for seq in seqs:
            seq.append_token(token)
