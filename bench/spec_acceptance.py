#!/usr/bin/env python3
"""Speculative decoding's acceptance on the demo model (CPU is fine: acceptance does not depend on
the device): n-gram lookup, a draft cut from the demo model (its first 2 of 4 layers), and the draft
trained like it (server/loader/demo/draft: 1 layer, 128 wide; scripts/train_draft_model.py), for the
base model and its upper-case adapter, on the committed chat dataset (examples/data/upper_chat.jsonl:
the adapter's training questions) and on a quoting / editing workload (a passage, then its first
half again: the model continues by copying or rewriting it). Greedy unless --temperature.

    python bench/spec_acceptance.py --out bench/results/spec-acceptance-cpu.md

Per row: acceptance rate (accepted / proposed draft tokens), tokens per verify step (1 + accepted /
drafts), and tokens per decode step of a sequence over the whole run (steps where nothing was
proposed count as 1), the figure speedup estimates start from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sloth_serve.config import Config  # noqa: E402
from sloth_serve.engine.llm_engine import LLMEngine  # noqa: E402
from sloth_serve.engine.sampling_params import SamplingParams, StructuredSpec  # noqa: E402
from sloth_serve.loader import DEMO_ADAPTER, DEMO_DRAFT, DEMO_MODEL  # noqa: E402
from sloth_serve.loader.peft import load_lora  # noqa: E402
from sloth_serve.loader.truncate import truncate_model  # noqa: E402

DATASET = ROOT / "examples" / "data" / "upper_chat.jsonl"


@dataclass
class Row:
    workload: str
    model: str
    method: str
    k: int
    acceptance: float
    per_verify: float
    per_step: float
    drafts: int
    tokens: int
    seconds: float
    accepted_per_pos: list[float]


def workloads(tokenizer, count: int) -> dict[str, list[list[int]]]:  # type: ignore[no-untyped-def]
    records = [json.loads(line) for line in DATASET.read_text().splitlines()[:count]]
    chats = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
             for r in records]
    # Quoting / editing: a passage (the dataset's answers, in the base model's own register:
    # lower-cased back), then its first half again.
    passages = [r["messages"][1]["content"].capitalize() for r in records]
    quotes = [f"{p}\n\n{p[: max(len(p) // 2, 8)]}" for p in passages]
    return {"chat dataset": [tokenizer.encode(c) for c in chats], "quoting": [tokenizer.encode(q) for q in quotes]}


# --structured: the chat dataset's questions answered under a JSON schema (structured output): drafts
# are cut where the grammar forbids them and verified under its masks. No ignore_eos there (the
# grammar ends the answer): fewer tokens per request.
ANSWER_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 60},
                                                  "answer": {"type": "string", "maxLength": 300}},
                 "required": ["name", "answer"], "additionalProperties": False}


def measure(prompts: list[list[int]], adapter: int, params: SamplingParams, tokenizer=None,  # type: ignore[no-untyped-def]
            **spec: object) -> tuple[dict, float]:
    engine = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=512,
                              max_num_seqs=8, speculative_max_batch_size=8, **spec))  # type: ignore[arg-type]
    if params.structured is not None:
        engine.runner.sampler.set_tokenizer(tokenizer, engine.loaded.model.config.vocab_size, engine.eos_token_ids)
    if adapter:
        engine.add_lora(1, load_lora("upper", DEMO_ADAPTER, engine.config.max_lora_rank))
    decode_steps = 0
    run = engine.runner.run

    def counting(batch, *args):  # type: ignore[no-untyped-def]
        nonlocal decode_steps
        decode_steps += sum(1 for i, s in enumerate(batch.seqs) if batch.samples(i) and s.num_output_tokens)
        return run(batch, *args)

    engine.runner.run = counting  # type: ignore[method-assign]
    start = time.perf_counter()
    tokens = 0
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params, adapter)
    while engine.has_unfinished_requests:
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    first_tokens = len(prompts)  # each request's first token comes from its prefill
    stats = engine.scheduler.spec_stats
    return {"stats": stats, "tokens": tokens, "per_step": (tokens - first_tokens) / max(decode_steps, 1)}, \
        time.perf_counter() - start


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        "# Speculative decoding: acceptance on the demo model (CPU)", "",
        f"`python bench/spec_acceptance.py --requests {args.requests} --max-tokens {args.max_tokens} "
        f"-k {args.k}{f' --temperature {args.temperature}' if args.temperature else ''}"
        f"{' --structured' if args.structured else ''}` "
        f"({time.strftime('%Y-%m-%d')}). Demo model (4 layers, float32, safetensors); drafts: its first 2 "
        "layers (`python -m sloth_serve.loader.truncate`), and the 1-layer draft trained like it "
        "(`server/loader/demo/draft`, `scripts/train_draft_model.py`), both proposing without the adapter. "
        "Requests run 8 at a "
        f"time; {'greedy' if not args.temperature else f'temperature {args.temperature}'}.", "",
        "| workload | model | method | k | acceptance | tokens / verify step | tokens / decode step | "
        "accepted at position 1..k | drafts | tokens | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pos = " / ".join(f"{x:.2f}" for x in r.accepted_per_pos) or "-"
        lines.append(f"| {r.workload} | {r.model} | {r.method} | {r.k} | {r.acceptance:.1%} | {r.per_verify:.2f} | "
                     f"{r.per_step:.2f} | {pos} | {r.drafts} | {r.tokens} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="prompts per workload")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("-k", type=int, default=4, help="--num-speculative-tokens")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--methods", default="ngram,cut,trained",
                        help="comma-separated: ngram, cut (the 2-layer cut draft), trained (the trained draft)")
    parser.add_argument("--structured", action="store_true",
                        help="only the chat dataset, its answers constrained to a JSON schema")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True, seed=0)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        draft = truncate_model(DEMO_MODEL, Path(tmp) / "draft", 2)
        every = {"ngram": ("ngram", {"speculative_method": "ngram"}),
                 "cut": ("draft (2 layers cut)", {"speculative_model": str(draft)}),
                 "trained": ("draft (1 layer trained)", {"speculative_model": str(DEMO_DRAFT)})}
        methods = dict(every[m] for m in args.methods.split(","))
        runs = {name: (prompts, params) for name, prompts in workloads(tokenizer, args.requests).items()}
        if args.structured:
            constrained = replace(params, ignore_eos=False, structured=StructuredSpec(json.dumps(ANSWER_SCHEMA)))
            runs = {"chat dataset, JSON schema": (runs["chat dataset"][0], constrained)}
        for workload, (prompts, run_params) in runs.items():
            for adapter, model in ((0, "base"), (1, "upper adapter")):
                for method, spec in methods.items():
                    out, seconds = measure(prompts, adapter, run_params, tokenizer, num_speculative_tokens=args.k,
                                           **spec)
                    s = out["stats"]
                    rows.append(Row(workload, model, method, args.k, s.acceptance_rate, s.mean_accepted_length,
                                    out["per_step"], s.num_drafts, out["tokens"], seconds,
                                    [n / s.num_drafts for n in s.accepted_per_pos] if s.num_drafts else []))
                    print(markdown(rows[-1:], args).splitlines()[-1], flush=True)
    text = markdown(rows, args)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
