"""A tokenizer the grammar engine cannot read (a word-level one without a decoder) leaves structured
outputs off with a reason: the model still loads, and constrained requests get a clear error."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from server.api.sampling import grammar_compiler
from server.engine.grammar import GrammarError
from server.engine.sampler import Sampler


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(30)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


def test_unsupported_tokenizer_disables_grammar_without_raising() -> None:
    sampler = Sampler(torch.device("cpu"))
    sampler.set_tokenizer(word_tokenizer(), 32, [0])
    assert sampler.grammar is None
    assert sampler.grammar_error is not None and "grammar engine" in sampler.grammar_error


def test_constrained_request_gets_grammar_error_naming_the_reason() -> None:
    sampler = Sampler(torch.device("cpu"))
    runtime = SimpleNamespace(engine=SimpleNamespace(runner=SimpleNamespace(sampler=sampler), eos_token_ids=[0]),
                              tokenizer=word_tokenizer(), vocab_size=32)
    with pytest.raises(GrammarError, match="not supported by the grammar engine"):
        asyncio.run(grammar_compiler(runtime))  # type: ignore[arg-type]
    assert sampler.grammar_error is not None  # tried once; later requests get the same answer at once
    with pytest.raises(GrammarError):
        asyncio.run(grammar_compiler(runtime))  # type: ignore[arg-type]
