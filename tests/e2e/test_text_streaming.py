"""The API's text path without a server, on the demo tokenizer: incremental detokenization never
emits a broken character (byte-level BPE splits "é" and emoji over several tokens) and stop
strings are cut out whatever the token boundaries. (A model cannot be made to emit such tokens
on demand, so these pieces are driven directly.)"""

from __future__ import annotations

import itertools

import pytest
from transformers import AutoTokenizer

from sloth_serve.api.detokenizer import IncrementalDetokenizer
from sloth_serve.api.logprobs import TokenTexts
from sloth_serve.api.stop_strings import StopStringMatcher
from sloth_serve.loader import DEMO_MODEL

TEXTS = ["naïve café ✓ 😀 done", "plain ascii text", "日本語のテキスト", "a\u0301 combining", "😀😀"]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_detokenizer_never_emits_broken_characters(tokenizer, text: str, chunk: int) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_fast_path_decodes_like_the_tokenizer(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The detokenizer calls the Rust tokenizer directly (backend_decoder); the text must be what
    tokenizer.decode gives, with and without special tokens; a slow-path tokenizer gets None."""
    import random

    from sloth_serve.api.detokenizer import backend_decoder

    backend = backend_decoder(tokenizer)
    assert backend is not None
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert backend.decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)

    class Cleaning:  # clean_up_tokenization_spaces changes the text: the fast path must not apply
        _tokenizer = backend
        clean_up_tokenization_spaces = True

    assert backend_decoder(Cleaning()) is None and backend_decoder(object()) is None


def test_multi_token_character_is_held_back_until_complete(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the premise: one character, several tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "😀"


def test_detokenizer_skips_special_tokens_when_asked(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode("hello<|im_end|> world", add_special_tokens=False)
    for skip, want in ((True, "hello world"), (False, "hello<|im_end|> world")):
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        assert "".join(detok.add([t]) for t in ids) + detok.flush() == want


def test_token_bytes_are_exact_for_partial_characters(tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("é😀", add_special_tokens=False)
    assert b"".join(bytes(texts.bytes(t)) for t in ids) == "é😀".encode()


def stream_through(stop: list[str], pieces: list[str]) -> tuple[str, str | None]:
    matcher = StopStringMatcher(stop)
    sent = "".join(matcher.feed(p) for p in pieces) + matcher.flush()
    return sent, matcher.matched


@pytest.mark.parametrize("cuts", [(), (3,), (5, 6), (1, 2, 3, 4, 5, 6, 7, 8, 9)])
def test_stop_string_is_cut_whatever_the_boundaries(cuts: tuple[int, ...]) -> None:
    text = "Hello STOP world"
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert stream_through(["STOP"], pieces) == ("Hello ", "STOP")


def test_nothing_after_or_within_a_stop_string_is_released() -> None:
    matcher = StopStringMatcher(["</end>"])
    released = [matcher.feed(p) for p in ["abc</", "en", "d> more", " text"]]
    assert released == ["abc", "", "", ""]
    assert matcher.flush() == ""


def test_partial_stop_prefix_is_released_when_no_stop_follows() -> None:
    assert stream_through(["STOP"], ["Hello ST", "ill going"]) == ("Hello STill going", None)
    assert stream_through(["STOP"], ["ends with ST"]) == ("ends with ST", None)


def test_earliest_of_several_stop_strings_wins() -> None:
    assert stream_through(["world", "lo w"], ["Hello world"]) == ("Hel", "lo w")
