"""A model folder's tokenizer, read with transformers, and which folder holds one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Any of these makes a folder's tokenizer its own (not only a template over the base's).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(folder: Path) -> Any:
    # Imported late: Unsloth (imported by the loader) wants to be imported before transformers.
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many kinds for a broken folder
        raise ValueError(f"the tokenizer in {folder} could not be loaded: {type(exc).__name__}: {exc}") from exc


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def base_tokenizer_folder(folder: Path, adapter_folder: Path | None) -> Path:
    """Whose tokenizer the base model uses: an adapter folder given as the model, if it has its own."""
    return adapter_folder if adapter_folder is not None and has_tokenizer(adapter_folder) else folder
