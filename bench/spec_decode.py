#!/usr/bin/env python3
"""What speculative decoding costs on the GPU (random weights make acceptance meaningless, so the
costs are measured and the gains derived): on the Llama-3-8B shape in NF4, the engine step that
verifies 1 + k tokens per sequence against a plain decode step, at several batch sizes; the
Llama-3.2-1B-shape draft model's proposal of k tokens; and from them tokens/s per sequence for
acceptance rates of 50/70/90% and the rates measured on the demo model (bench/results/
spec-acceptance-cpu.md), and the batch size above which speculation stops paying.

    python bench/spec_decode.py --out $OUT/spec-decode-h200.md [--k 2,4] [--measured ngram=0.31,draft=0.25]

Tokens per verify step with per-token acceptance a and k drafts (independent acceptances):
(1 - a^(k+1)) / (1 - a). Step times are engine.step() wall times (host work included), averaged
over --steps steps after warm-up steps that compile the kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.engine import SHAPES, random_nf4_model
from sloth_serve.config import Config
from sloth_serve.engine.cuda_graphs import default_buckets
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.engine.spec_decode.draft import DraftRunner

PROMPT_LEN = 64
DEVICE = torch.device("cuda")
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verify step emits: the accepted run of drafts plus the target's own token."""
    return float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def make_engine(loaded, k: int, max_batch: int) -> LLMEngine:  # type: ignore[no-untyped-def]
    return LLMEngine(Config(model="", device=DEVICE.type, max_model_len=2048, max_num_seqs=max(max_batch, 64),
                            num_kv_blocks=4096, speculative_method="ngram", num_speculative_tokens=k,
                            speculative_max_batch_size=max_batch), loaded)


def force_drafts(engine: LLMEngine, k: int | None) -> None:
    """Every decoding sequence proposes k tokens (its last token repeated): verify steps of 1 + k
    tokens whatever the text; None: nobody proposes (plain decode steps)."""
    spec = engine.spec
    assert spec is not None

    def propose(running, sampler, draft_probs):  # type: ignore[no-untyped-def]
        for seq in running:
            n = min(k or 0, spec.num_tokens_for(seq))
            seq.spec_token_ids = [seq.token_ids[-1]] * n

    spec.propose = propose  # type: ignore[method-assign]


def step_ms(engine: LLMEngine, batch: int, steps: int, warmup: int = 6) -> float:
    vocab = engine.loaded.model.config.vocab_size
    params = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", [(7 * i + j) % vocab for j in range(PROMPT_LEN)], params)
    for _ in range(warmup):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    ms = 1000 * (time.perf_counter() - start) / steps
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(seq.request_id)
    engine.step()
    return ms


def draft_ms(engine: LLMEngine, draft: DraftRunner, batch: int, k: int, steps: int) -> float:
    """One proposal of k tokens for `batch` decoding sequences (k single-token draft forwards)."""
    force_drafts(engine, None)
    vocab = engine.loaded.model.config.vocab_size
    params = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", [(5 * i + j) % vocab for j in range(PROMPT_LEN)], params)
    while not engine.scheduler.running or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()  # every prompt prefilled: each proposal below is k single-token draft steps
    seqs = list(engine.scheduler.running)
    for seq in seqs:
        assert engine.block_manager.allocate_slots(seq, 1 + k)
    sampler, probs = engine.runner.sampler, engine.runner.draft_probs
    for _ in range(3):
        draft.propose(seqs, [k] * batch, sampler, probs)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        draft.propose(seqs, [k] * batch, sampler, probs)
    sync()
    ms = 1000 * (time.perf_counter() - start) / steps
    for seq in seqs:
        seq.spec_token_ids = []
        engine.abort(seq.request_id)
    engine.step()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="markdown file to write")
    ap.add_argument("--k", default="2,4", help="draft lengths to measure, comma-separated")
    ap.add_argument("--batches", default="1,4,8,16,32,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny random models on the CPU: checks the script runs")
    ap.add_argument("--measured", default="", help="name=acceptance pairs from the demo model, e.g. ngram=0.3")
    args = ap.parse_args()
    ks = [int(x) for x in args.k.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    measured = {n: float(v) for n, v in (p.split("=") for p in args.measured.split(",") if p)}
    global DEVICE
    target_shape, draft_shape = "llama3-8b", "llama3.2-1b"
    if args.smoke:
        DEVICE, target_shape, draft_shape = torch.device("cpu"), "tiny", "tiny"
        SHAPES["tiny"] = TINY
    t0 = time.perf_counter()
    engine = make_engine(random_nf4_model(target_shape, DEVICE), max(ks), max(batches))
    draft = DraftRunner(random_nf4_model(draft_shape, DEVICE).model, engine.block_manager.num_blocks,
                        engine.config.block_size, engine.device, engine.dtype, 2048, default_buckets(max(batches)))
    built = time.perf_counter() - t0
    plain: dict[int, float] = {}
    verify: dict[tuple[int, int], float] = {}
    drafting: dict[tuple[int, int], float] = {}
    for b in batches:
        force_drafts(engine, None)
        plain[b] = step_ms(engine, b, args.steps)
        for k in ks:
            force_drafts(engine, k)
            verify[(b, k)] = step_ms(engine, b, args.steps)
            drafting[(b, k)] = draft_ms(engine, draft, b, k, args.steps)
        print(f"batch {b}: plain {plain[b]:.2f} ms, verify {[round(verify[(b, k)], 2) for k in ks]}, "
              f"draft {[round(drafting[(b, k)], 2) for k in ks]}", flush=True)
    # Speculation off above the cap: a batch of the largest size stepped with speculation configured
    # (the real n-gram proposer, capped at batch 8: nobody proposes) and without it (engine.spec None:
    # the engine as if no speculation were configured), alternating, best of 3 rounds each (a single
    # pair measured once differed by 3.6% with no host work to explain it).
    spec = engine.spec
    assert spec is not None
    del spec.propose  # type: ignore[method-assign]
    spec.config = replace(spec.config, max_batch_size=8)
    big = max(batches)
    capped = unspec = float("nan")
    if big > 8:
        capped_runs, unspec_runs = [], []
        for _ in range(3):
            engine.spec = spec
            capped_runs.append(step_ms(engine, big, args.steps))
            engine.spec = None
            unspec_runs.append(step_ms(engine, big, args.steps))
        engine.spec = spec
        capped, unspec = min(capped_runs), min(unspec_runs)
    report = render(args, ks, batches, plain, verify, drafting, measured, (capped, unspec), built,
                    time.perf_counter() - t0)
    args.out.write_text(report)
    print(report)


def render(args, ks, batches, plain, verify, drafting, measured, capped, built, total) -> str:  # type: ignore[no-untyped-def]
    gpu = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (smoke run: tiny random models)"
    lines = [f"# Speculative decoding costs on the {gpu} (8B NF4 target, 1B-shape NF4 draft)", "",
             f"`python bench/spec_decode.py --k {args.k} --batches {args.batches} --steps {args.steps}"
             f"{' --measured ' + args.measured if args.measured else ''}` ({time.strftime('%Y-%m-%d')}, torch "
             f"{torch.__version__}; models built in {built:.0f} s, whole run {total:.0f} s). Random weights, "
             f"{PROMPT_LEN}-token prompts, greedy. Step = `engine.step()` wall time in ms.", "",
             "## Step times", "",
             "| batch | plain decode | " + " | ".join(f"verify 1+{k} | draft proposes {k}" for k in ks) + " |",
             "|---|---|" + "---|---|" * len(ks)]
    for b in batches:
        lines.append(f"| {b} | {plain[b]:.2f} | "
                     + " | ".join(f"{verify[(b, k)]:.2f} | {drafting[(b, k)]:.2f}" for k in ks) + " |")
    rates = {"50%": 0.5, "70%": 0.7, "90%": 0.9, **{f"{n} (measured {a:.0%})": a for n, a in measured.items()}}
    for b in batches:
        lines += ["", f"## Tokens/s per sequence at batch {b} (plain decoding: {1000 / plain[b]:.0f})", "",
                  "| acceptance | " + " | ".join(f"n-gram k={k} | draft k={k}" for k in ks) + " |",
                  "|---|" + "---|---|" * len(ks)]
        for name, a in rates.items():
            cells = []
            for k in ks:
                tokens = expected_tokens(a, k)
                cells += [f"{1000 * tokens / verify[(b, k)]:.0f}",
                          f"{1000 * tokens / (verify[(b, k)] + drafting[(b, k)]):.0f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Where speculation stops paying", "",
              "Break-even acceptance per batch size: the lowest per-token acceptance at which a verify step "
              "(n-gram; draft: plus its proposal) gives more tokens/s than plain decoding.", "",
              "| batch | " + " | ".join(f"n-gram k={k} | draft k={k}" for k in ks) + " |", "|---|" + "---|---|" * len(ks)]
    for b in batches:
        cells = []
        for k in ks:
            for cost in (verify[(b, k)], verify[(b, k)] + drafting[(b, k)]):
                need = cost / plain[b]
                even = next((a / 100 for a in range(0, 100) if expected_tokens(a / 100, k) >= need), None)
                cells.append("never" if even is None else f"{even:.0%}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    big = max(batches)
    if big > 8:
        lines += ["", f"Batch {big} with speculation configured but above --speculative-max-batch-size 8 (nobody "
                  f"proposes): {capped[0]:.2f} ms a step against {capped[1]:.2f} ms with no speculation configured "
                  f"(same engine, alternating, best of 3 each; {plain[big]:.2f} ms in the table above)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
