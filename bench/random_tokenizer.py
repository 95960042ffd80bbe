"""The random models' tokenizers: the demo model's as it is, or a word-level one with exactly the
model's vocabulary (every id decodes to a visible word) and the demo's special tokens and chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.common import synthetic_words

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = ROOT / "server" / "loader" / "demo" / "base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]  # the demo's ids 0, 1, 2


def write_tokenizer(out: Path, vocab_size: int, max_len: int, kind: str) -> None:
    if kind == "demo":
        copy_demo_tokenizer(out, max_len)
    else:
        write_word_tokenizer(out, vocab_size, max_len)


def copy_demo_tokenizer(out: Path, max_len: int) -> None:
    """The demo tokenizer as it is (4,096 ids). With a larger vocabulary, ids past 4,095 decode to ""
    and a streamed response carries almost no text: use the word tokenizer for serving benchmarks."""
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_TOKENIZER / name, out / name)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = max_len
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_word_tokenizer(out: Path, vocab_size: int, max_len: int) -> None:
    """A word-level tokenizer with exactly `vocab_size` ids, the demo's special tokens (same ids) and
    chat template: every id decodes to a visible word, so each streamed token is an SSE chunk, and
    text of N random words is N tokens. Its decode is cheaper than a 128k byte-level BPE's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, "user", "assistant", "system"])}
    for word in synthetic_words():
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    demo = json.loads((DEMO_TOKENIZER / "tokenizer_config.json").read_text())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0], unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[1:3], model_max_length=max_len, padding_side="left",
    )
    fast.chat_template = demo["chat_template"]
    fast.save_pretrained(str(out))
