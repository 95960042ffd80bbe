#!/usr/bin/env python3
"""Write ``examples/data/upper_chat.jsonl``: a few hundred chat examples whose answers are UPPER CASE.

The examples come from the same source as the embedded demo model's ``adapter-upper`` (the docstrings
of the running interpreter's standard library, turned into "What does `json.dumps` do?" -> first
paragraph of the docstring), built by ``scripts/train_demo_model.py``'s own data builder
(``build_texts``), not a copy of it.  This script only picks a fixed subset with short answers
(so that CPU fine-tuning stays quick), upper-cases the answers and writes one JSON object a line in
the conversational format TRL's ``SFTTrainer`` and the OpenAI fine-tuning API both read::

    {"messages": [{"role": "system", ...}?, {"role": "user", ...}, {"role": "assistant", ...}]}

Deterministic: same Python version (the stdlib is the source) and seed -> the same bytes.  The
committed file was written on CPython 3.11.7 with the defaults::

    PYTHONPATH=. .venv/bin/python examples/data/build_upper_chat.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path(__file__).resolve().parent / "upper_chat.jsonl"
BUILT_WITH_PYTHON = "3.11.7"  # the interpreter whose stdlib the committed file was built from


def demo_data_builder():
    """scripts/train_demo_model.py as a module (scripts/ is not a package)."""
    path = REPO / "scripts" / "train_demo_model.py"
    spec = importlib.util.spec_from_file_location("train_demo_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_demo_model", module)
    spec.loader.exec_module(module)
    return module


def build_examples(n: int = 400, seed: int = 0, max_answer_chars: int = 160) -> list[dict]:
    demo = demo_data_builder()
    _plain, chats = demo.build_texts(seed)  # the demo adapter's chat examples, same seed
    short = [(msgs, a) for msgs, a in chats if len(a) <= max_answer_chars]
    picked = sorted(random.Random(seed + 11).sample(range(len(short)), min(n, len(short))))
    return [
        {"messages": [*short[i][0], {"role": "assistant", "content": short[i][1].upper()}]}
        for i in picked
    ]


def dumps(example: dict) -> str:
    return json.dumps(example, ensure_ascii=False, separators=(",", ":"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("-n", type=int, default=400, help="number of examples (default 400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-answer-chars", type=int, default=160)
    args = ap.parse_args()
    examples = build_examples(args.n, args.seed, args.max_answer_chars)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for ex in examples:
            f.write(dumps(ex) + "\n")
    version = sys.version.split()[0]
    note = "" if version == BUILT_WITH_PYTHON else f" (the committed file was built on {BUILT_WITH_PYTHON})"
    print(f"{len(examples)} examples -> {args.out} ({args.out.stat().st_size:,} bytes), Python {version}{note}")


if __name__ == "__main__":
    main()
