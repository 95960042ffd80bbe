"""Speculative decoding with structured output: drafts are cut at the first token the grammar forbids,
each verified row is masked by the grammar after the drafts before it, and the matcher stays at the
sequence's tokens. Sampled tokens keep the constrained distribution (a forbidden token drawn from a
draft model's q stays as the last draft so that its rejection draws from the residual; cutting it
instead is measurably off), and on the demo model greedy JSON-schema and regex outputs equal plain
decoding token for token, with n-gram lookup and with a draft model, beside a free request."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sloth_serve.config import Config
from sloth_serve.engine.grammar import GrammarCompiler, allowed_tokens
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampler import Sampler
from sloth_serve.engine.sampling_params import SamplingParams, StructuredSpec
from sloth_serve.engine.sequence import Sequence
from sloth_serve.engine.spec_decode.proposer import SpecDecoder
from sloth_serve.engine.spec_decode.rejection import sample_with_drafts, target_probs
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.loader.truncate import truncate_model

VOCAB = 4096
EOS = 2
REGEX = "[abc][abc][abc]"
N = 6_000  # sequences: the TV distance of N draws from p itself is about 0.015
TV_BOUND = 0.04


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE over the 256 bytes, EOS and one merge ("ab"): the distribution tests' rows are
    258 logits wide, not the demo model's 4096, so that 12,000 sequences take a second."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}, "ab": len(alphabet) + 1}
    tok = Tokenizer(models.BPE(vocab, [("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def small() -> tuple[GrammarCompiler, PreTrainedTokenizerFast]:
    tok = byte_tokenizer()
    return GrammarCompiler(tok, len(tok), [0]), tok


def allowed_after(compiler: GrammarCompiler, tokens: list[int]) -> torch.Tensor:
    """What the grammar allows after `tokens`, from a matcher of its own."""
    matcher = compiler.compile(StructuredSpec(REGEX, kind="regex")).deep_copy()
    assert matcher.consume_tokens(tokens) if tokens else True
    mask = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32).unsqueeze(0)
    return allowed_tokens(mask, compiler.vocab_size)[0]


def masked_p(logits: torch.Tensor, allowed: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    row = logits.masked_fill(~allowed, float("-inf")).unsqueeze(0)
    return target_probs(row, [Sequence("p", [1], params)])[0]


def tv(tokens: list[int], p: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=p.shape[0]).double()
    return 0.5 * (counts / counts.sum() - p.double()).abs().sum().item()


def verify(
    compiler: GrammarCompiler,
    params: SamplingParams,
    drafts: list[list[int]],
    q: torch.Tensor | None,
    logits: torch.Tensor,
    keep_forbidden: bool,
) -> tuple[list[Sequence], list[int]]:
    """Each sequence proposes its drafts, cut at the grammar as the proposer does, then verifies them."""
    sampler = Sampler(torch.device("cpu"))
    sampler.grammar = compiler
    spec = StructuredSpec(REGEX, kind="regex")
    seqs = [Sequence(f"r{i}", [1, 2, 3], replace(params, structured=spec)) for i in range(len(drafts))]
    for seq, d in zip(seqs, drafts, strict=True):
        seq.spec_token_ids = list(d)
        SpecDecoder._cut_at_grammar(seq, sampler, keep_forbidden)
    probs = {} if q is None else {seq.request_id: q for seq in seqs}
    rows = torch.cat([logits[: 1 + len(seq.spec_token_ids)] for seq in seqs])
    tokens, _ = sample_with_drafts(sampler, rows, seqs, probs)
    # The matchers were rolled back: still at the prompt, none of the drafts consumed.
    matcher = sampler.matchers.matches[seqs[0].request_id].matcher
    assert matcher is not None
    mask = allowed_tokens(
        torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)[None], compiler.vocab_size
    )
    assert torch.equal(mask[0], allowed_after(compiler, []))
    return seqs, tokens


def first_emitted(seqs: list[Sequence], tokens: list[int]) -> list[int]:
    return [
        seq.spec_token_ids[0] if seq.num_spec_accepted else token
        for seq, token in zip(seqs, tokens, strict=True)
    ]


def test_ngram_drafts_cut_at_the_grammar_keep_the_constrained_distribution(small) -> None:  # type: ignore[no-untyped-def]
    compiler, tokenizer = small
    torch.manual_seed(0)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    a, b, z = (tokenizer.encode(c)[0] for c in "abz")
    logits = torch.randn(3, compiler.vocab_size) * 2
    logits[:, [a, b, z]] += 4.0  # the forbidden z would be likely without the grammar
    p0 = masked_p(logits[0], allowed_after(compiler, []), params)
    draft = int(p0.argmax())  # often accepted, often not
    p1 = masked_p(logits[1], allowed_after(compiler, [draft]), params)
    seqs, tokens = verify(compiler, params, [[draft, z, a]] * N, None, logits, keep_forbidden=False)
    assert all(seq.spec_token_ids == [draft] for seq in seqs)  # z is never allowed: cut there
    assert tv(first_emitted(seqs, tokens), p0) < TV_BOUND
    after = [t for s, t in zip(seqs, tokens, strict=True) if s.num_spec_accepted == 1]
    assert len(after) > N // 5 and tv(after, p1) < TV_BOUND
    assert p0[z] == 0 and p1[z] == 0 and z not in tokens


def test_a_forbidden_token_drawn_from_q_stays_so_its_rejection_keeps_p(small) -> None:  # type: ignore[no-untyped-def]
    """q puts half its mass on tokens the grammar forbids. Kept as the last draft, a forbidden token
    is rejected at its row and the residual norm(max(0, p - q)) is drawn: tokens distributed as p.
    Cut instead (the row then draws from p) the output is visibly biased toward what q lacks."""
    compiler, tokenizer = small
    torch.manual_seed(1)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    a, b, c, x, z = (tokenizer.encode(t)[0] for t in "abcxz")
    logits = torch.randn(3, compiler.vocab_size)
    logits[:, [a, b, c]] += 6.0
    q = torch.zeros(2, compiler.vocab_size)
    q[:, [a, x, z]] = torch.tensor([0.5, 0.25, 0.25])
    drafts = torch.multinomial(q, N, replacement=True).T.tolist()
    p0 = masked_p(logits[0], allowed_after(compiler, []), params)
    seqs, tokens = verify(compiler, params, drafts, q, logits, keep_forbidden=True)
    assert any(
        len(s.spec_token_ids) == 1 and s.spec_token_ids[0] in (x, z) for s in seqs
    )  # kept, then rejected
    assert tv(first_emitted(seqs, tokens), p0) < TV_BOUND
    seqs, tokens = verify(compiler, params, drafts, q, logits, keep_forbidden=False)
    assert tv(first_emitted(seqs, tokens), p0) > 2 * TV_BOUND


# --- greedy equality on the demo model ------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["function", "class", "module"]},
        "doc": {"type": "string", "maxLength": 120},
    },
    "required": ["name", "kind", "doc"],
    "additionalProperties": False,
}
QUOTED = (
    '{"name": "json.dumps", "kind": "function", "doc": "Serialize obj to a JSON formatted str."}\n'
    '{"name": "json.loads", "kind": "function", "doc": "Deserialize s to a Python object."}\n'
)


@pytest.fixture(scope="module")
def requests(tokenizer) -> list[tuple[list[int], SamplingParams]]:  # type: ignore[no-untyped-def]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe `json.dumps` as JSON."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    json_spec = StructuredSpec(json.dumps(SCHEMA))
    regex_spec = StructuredSpec(r"Return (the|a) [a-z ]{1,30}\.", kind="regex")
    return [
        (
            tokenizer.encode(QUOTED + '{"name": "json.dumps", '),
            SamplingParams(max_tokens=48, temperature=0, structured=json_spec),
        ),
        (tokenizer.encode(chat), SamplingParams(max_tokens=48, temperature=0, structured=json_spec)),
        (
            tokenizer.encode("Return the value. Return the value of x.\n"),
            SamplingParams(max_tokens=24, temperature=0, structured=regex_spec),
        ),
        (tokenizer.encode(QUOTED), SamplingParams(max_tokens=32, temperature=0)),  # free, beside them
    ]


def generate(tokenizer, requests: list, **config: Any) -> tuple[list[list[int]], LLMEngine, list]:  # type: ignore[no-untyped-def]
    """Every request's tokens, the engine, and (drafts proposed, drafts the grammar allowed) of each
    constrained proposal."""
    settings: dict[str, Any] = {
        "model": str(DEMO_MODEL),
        "load_format": "safetensors",
        "num_kv_blocks": 128,
        "max_num_seqs": 8,
    }
    engine = LLMEngine(Config(**settings, **config))
    engine.runner.sampler.set_tokenizer(tokenizer, VOCAB, [EOS])
    matchers = engine.runner.sampler.matchers
    count = matchers.num_valid_drafts
    cuts: list[tuple[int, int]] = []

    def num_valid_drafts(seq, compiler):  # type: ignore[no-untyped-def]
        valid = count(seq, compiler)
        cuts.append((len(seq.spec_token_ids), valid))
        return valid

    matchers.num_valid_drafts = num_valid_drafts  # type: ignore[method-assign]
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [tokens[str(i)] for i in range(len(requests))], engine, cuts


@pytest.fixture(scope="module")
def plain(tokenizer, requests: list) -> list[list[int]]:  # type: ignore[no-untyped-def]
    out, _, cuts = generate(tokenizer, requests)
    assert not cuts
    jsonschema.validate(json.loads(tokenizer.decode(out[0], skip_special_tokens=True)), SCHEMA)
    assert re.fullmatch(r"Return (the|a) [a-z ]{1,30}\.", tokenizer.decode(out[2], skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return truncate_model(DEMO_MODEL, tmp_path_factory.mktemp("draft") / "demo-2-layers", 2)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_structured_output_with_speculation_equals_plain_decoding(
    tokenizer, requests: list, plain: list, draft_folder: Path, method: str
) -> None:  # type: ignore[no-untyped-def]
    spec: dict[str, object] = (
        {"speculative_method": "ngram"} if method == "ngram" else {"speculative_model": str(draft_folder)}
    )
    got, engine, cuts = generate(tokenizer, requests, num_speculative_tokens=4, **spec)
    assert got == plain
    assert engine.scheduler.spec_stats.num_accepted_tokens > 10
    # Constrained drafts were verified whole and cut where the grammar forbade them.
    assert any(valid == n > 0 for n, valid in cuts) and any(valid < n for n, valid in cuts)
