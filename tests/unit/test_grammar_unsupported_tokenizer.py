"""A tokenizer the grammar engine cannot read (a word-level one without a decoder) leaves structured
outputs off with a reason: the model still loads, and constrained requests get a clear error."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sloth_serve.api.engine_params import compile_spec
from sloth_serve.api.errors import APIError
from sloth_serve.engine.grammar import make_compiler
from sloth_serve.engine.sampler import Sampler
from sloth_serve.engine.sampling_params import StructuredSpec


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


def test_constrained_request_gets_a_400_naming_the_reason() -> None:
    compiler, error = make_compiler(word_tokenizer(), 32, [0])  # what the front end makes at start-up
    runtime = SimpleNamespace(grammar=compiler, grammar_error=error)
    for _ in range(2):  # tried once at start-up; every request gets the same answer at once
        with pytest.raises(APIError, match="not supported by the grammar engine") as raised:
            asyncio.run(compile_spec(runtime, StructuredSpec.json_object(), "response_format"))  # type: ignore[arg-type]
        assert raised.value.status_code == 400 and raised.value.param == "response_format"
