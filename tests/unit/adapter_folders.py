"""Adapter folders as Unsloth / PEFT / transformers write them, built from the demo adapter: the
weights alone, or with a tokenizer whose chat template and EOS the fine-tune changed."""

from __future__ import annotations

import shutil
from pathlib import Path

from sloth_serve.api.tokenizers import load_tokenizer
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL

# An Alpaca-style template that ends each answer with a new special token (the demo's is ChatML).
ALPACA = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}<|reply|>\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
REPLY_ID, SQL_ID = 4096, 4097  # the added tokens' ids: right after the demo's 4096-token vocabulary


def adapter_folder(root: Path, name: str) -> Path:
    """A copy of the demo adapter's weights, as PEFT's save_pretrained writes them."""
    folder = root / name
    folder.mkdir()
    for f in DEMO_ADAPTER.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def save_alpaca_tokenizer(folder: Path) -> None:
    """What `tokenizer.save_pretrained` writes after a fine-tune switched to the Alpaca template with
    its own end token (transformers 5 writes chat_template.jinja): two added tokens, one the EOS."""
    tokenizer = load_tokenizer(DEMO_MODEL)
    tokenizer.add_tokens(["<|reply|>"], special_tokens=True)
    tokenizer.add_tokens(["<SQL>"])
    tokenizer.eos_token = "<|reply|>"
    tokenizer.chat_template = ALPACA
    tokenizer.save_pretrained(str(folder))
