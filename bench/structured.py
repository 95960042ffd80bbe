"""Cost of constrained decoding, and the measurements behind the choice of grammar library.

0. `check`: on the chosen device, 16 constrained requests at temperature 1 all parse and validate,
   and free greedy requests give the same tokens with and without constrained neighbours.
1. `libraries`: xgrammar and llguidance (whichever are installed) on the same token streams (valid
   JSON documents of one schema, tokenized): host time to fill one token mask, per row, at batch 1
   and 64, and to advance a matcher by one token; plus exactness: random walks through each
   library's masks on small schemas, each output checked with json.loads + jsonschema.
2. `engine`: the engine alone with the demo model (or --model): decode step time with B free
   requests vs B requests constrained by a JSON schema (one that keeps every request running, so
   batches stay full), and the host time of the grammar work in each step.

    python bench/structured.py --parts check,libraries,engine --batch-sizes 1,64 [--device cuda] \\
        [--vocab 32000] --out bench/results/structured.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import now_iso, package_versions
from sloth_serve.loader import DEMO_MODEL

DOC_SCHEMA = {  # the token streams of part 1: objects, enums, bounded ints, strings, arrays
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "integer"}}, "required": ["city", "zip"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "address", "tags"],
    "additionalProperties": False,
}
EXACTNESS_SCHEMAS = {  # name -> schema whose outputs each library's masks must keep valid
    "string maxLength": {"type": "string", "maxLength": 4},
    "nested required": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "string", "maxLength": 3}}, "required": ["b"]}}, "required": ["a"]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "number"}]},
    "enum + integer range": {"type": "object", "properties": {"k": {"enum": ["x", "y"]}, "n": {
        "type": "integer", "minimum": -5, "maximum": 300}}, "required": ["k", "n"]},
}
WORDS = ["Ada", "Paris", "blue", "x", "Zoë", "a b", "日本", "ok", "Jean-Luc", "7"]
ESCAPES = ["q\"t", "tab\tz", "back\\slash"]  # valid in JSON strings, written escaped


def random_doc(rng: random.Random, words: list[str] = WORDS) -> dict[str, Any]:
    def word(n: int) -> str:
        return rng.choice(words)[:n]
    return {"name": word(24), "age": rng.randint(0, 120), "color": rng.choice(["red", "green", "blue"]),
            "address": {"city": word(16), "zip": rng.randint(0, 99999)},
            "tags": [word(8) for _ in range(rng.randint(0, 3))]}


def load_tokenizer(vocab: int | None) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if vocab is None:
        return AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    # A byte-level BPE of the asked size trained on the standard library's sources (offline).
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


# --- part 1: libraries ---------------------------------------------------------------------------


class Lib:
    """One library behind a common face: new matcher, batch fill, accept."""

    def __init__(self, name: str, tokenizer: Any, vocab: int, eos: int, schema: str) -> None:
        self.name, self.vocab, self.eos = name, vocab, eos
        t0 = time.perf_counter()
        if name.startswith("xgrammar"):
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
            self.tokenizer_s = time.perf_counter() - t0
            self.xgr, self.compiler = xgr, xgr.GrammarCompiler(info, cache_enabled=False)
            self.batch = xgr.BatchGrammarMatcher(max_threads=os.cpu_count() or 1)
        else:
            import llguidance
            import llguidance.hf
            import llguidance.torch

            self.llg, self.llgt = llguidance, llguidance.torch
            self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
            self.tokenizer_s = time.perf_counter() - t0
            self.executor = llguidance.LLExecutor()
        t0 = time.perf_counter()
        self.template = self.compile(schema)
        self.compile_s = time.perf_counter() - t0

    def compile(self, schema: str) -> Any:
        if self.name.startswith("xgrammar"):
            return self.compiler.compile_json_schema(schema, any_whitespace=False)
        from sloth_serve.engine.grammar import JSON_OPTIONS

        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        matcher = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def new(self, template: Any = None) -> Any:
        template = template if template is not None else self.template
        if self.name.startswith("xgrammar"):
            return self.xgr.GrammarMatcher(template, override_stop_tokens=[self.eos])
        return template.deep_copy()

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        if self.name == "xgrammar":  # its batch API: a thread pool
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        elif self.name == "xgrammar-loop":  # one matcher after the other, no threads
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)
        else:
            self.llgt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        if self.name.startswith("xgrammar"):
            return bool(matcher.accept_token(token))
        return bool(matcher.consume_token(token))


def time_library(lib: Lib, docs: list[list[int]], batch: int, steps: int) -> dict[str, float]:
    """Each of `batch` lanes feeds documents one token a step (EOS after each), a new matcher per
    document; returns microseconds per row filled, per token accepted, per new matcher."""
    from sloth_serve.engine.grammar import bitmask_width

    bitmask = torch.full((batch, bitmask_width(lib.vocab)), -1, dtype=torch.int32)
    lanes = [[i % len(docs), 0, lib.new()] for i in range(batch)]
    fill_s = accept_s = new_s = 0.0
    news = 0
    for _ in range(steps):
        t0 = time.perf_counter()
        lib.fill([lane[2] for lane in lanes], bitmask)
        t1 = time.perf_counter()
        for lane in lanes:
            doc = docs[lane[0]] + [lib.eos]
            assert lib.accept(lane[2], doc[lane[1]]), (lib.name, doc, lane[1])
            lane[1] += 1
        t2 = time.perf_counter()
        fill_s += t1 - t0
        accept_s += t2 - t1
        for lane in lanes:
            if lane[1] == len(docs[lane[0]]) + 1:
                t3 = time.perf_counter()
                lane[:] = [(lane[0] + batch) % len(docs), 0, lib.new()]
                new_s += time.perf_counter() - t3
                news += 1
    rows = steps * batch
    return {"fill_us": fill_s / rows * 1e6, "accept_us": accept_s / rows * 1e6, "new_us": new_s / max(news, 1) * 1e6}


def exactness(lib: Lib, tokenizer: Any, walks: int = 40) -> dict[str, str]:
    """Random walks (EOS taken half the time it is allowed, else a uniform allowed token); the share
    of finished outputs that parse and validate. A schema the library refuses is reported so."""
    import jsonschema

    from sloth_serve.engine.grammar import allowed_tokens, bitmask_width

    out: dict[str, str] = {}
    bitmask = torch.full((1, bitmask_width(lib.vocab)), -1, dtype=torch.int32)
    for name, schema in EXACTNESS_SCHEMAS.items():
        try:
            template = lib.compile(json.dumps(schema))
        except Exception as exc:
            out[name] = f"refused ({str(exc).splitlines()[0][-60:]})"
            continue
        rng, valid, finished = random.Random(0), 0, 0
        for _ in range(walks):
            matcher, tokens = lib.new(template), []
            for _ in range(120):
                lib.fill([matcher], bitmask)
                allowed = allowed_tokens(bitmask, lib.vocab)[0].nonzero().flatten().tolist()
                token = lib.eos if lib.eos in allowed and rng.random() < 0.5 else rng.choice(allowed)
                if token == lib.eos:
                    break
                lib.accept(matcher, token)
                tokens.append(token)
            else:
                continue
            finished += 1
            try:
                jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema,
                                    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
                valid += 1
            except Exception:
                pass
        out[name] = f"{valid}/{finished}"
    return out


def part_libraries(args: argparse.Namespace, lines: list[str]) -> None:
    tokenizer = load_tokenizer(args.vocab)
    vocab = args.vocab or 4096
    eos = tokenizer.eos_token_id
    rng = random.Random(0)
    docs = [tokenizer.encode(json.dumps(random_doc(rng), ensure_ascii=False), add_special_tokens=False)
            for _ in range(200)]
    libs = [Lib(name, tokenizer, vocab, eos, json.dumps(DOC_SCHEMA))
            for name in ("xgrammar", "xgrammar-loop", "llguidance") if _installed(name.split("-")[0])]
    lines += [f"## Grammar libraries: vocabulary {vocab}, {os.cpu_count()} CPU cores", "",
              f"Mean document: {sum(map(len, docs)) / len(docs):.0f} tokens. Host microseconds.", "",
              "| library | batch | mask fill / row | accept / token | new matcher | compile | tokenizer setup |",
              "|---|---|---|---|---|---|---|"]
    for lib in libs:
        for batch in args.batch_sizes:
            r = time_library(lib, docs, batch, args.lib_steps)
            lines.append(f"| {lib.name} | {batch} | {r['fill_us']:.1f} | {r['accept_us']:.1f} | {r['new_us']:.1f} | "
                         f"{lib.compile_s * 1e3:.1f} ms | {lib.tokenizer_s * 1e3:.0f} ms |")
    libs = [lib for lib in libs if lib.name != "xgrammar-loop"]  # same masks as xgrammar
    lines += ["", "Exactness: finished random walks whose output parses and validates (refused: the "
              "library rejects the schema, which the API returns as a 400).", "",
              "| schema | " + " | ".join(lib.name for lib in libs) + " |", "|---|" + "---|" * len(libs)]
    results = [exactness(lib, tokenizer) for lib in libs]
    for name in EXACTNESS_SCHEMAS:
        lines.append(f"| {name} | " + " | ".join(r[name] for r in results) + " |")
    escaped = [json.dumps(random_doc(rng, ESCAPES), ensure_ascii=False) for _ in range(50)]
    accepted = [sum(accepts(lib, tokenizer.encode(d, add_special_tokens=False)) for d in escaped) for lib in libs]
    lines += ["| valid documents with escapes in maxLength strings, accepted | "
              + " | ".join(f"{a}/{len(escaped)}" for a in accepted) + " |", ""]


def accepts(lib: Lib, tokens: list[int]) -> bool:
    matcher = lib.new()
    return all(lib.accept(matcher, t) for t in [*tokens, lib.eos])


def _installed(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# --- part 2: engine ------------------------------------------------------------------------------

LONG_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1000}


def part_engine(args: argparse.Namespace, lines: list[str]) -> None:
    from transformers import AutoTokenizer

    from sloth_serve.config import Config
    from sloth_serve.engine.llm_engine import LLMEngine
    from sloth_serve.engine.sampling_params import SamplingParams, StructuredSpec

    config = Config(model=args.model, device=args.device, load_format=args.load_format,
                    max_num_seqs=max(args.batch_sizes), num_kv_blocks=args.num_kv_blocks)
    engine = LLMEngine(config)
    tokenizer = AutoTokenizer.from_pretrained(str(engine.loaded.folder))
    sampler = engine.runner.sampler
    sampler.set_tokenizer(tokenizer, engine.loaded.model.config.vocab_size, engine.eos_token_ids)
    timers = {"grammar": 0.0, "sampler": 0.0}
    _time_calls(sampler.matchers, "fill", timers, "grammar")
    engine.runner.sampler = _TimedSampler(sampler, timers)
    spec = StructuredSpec(json.dumps(LONG_SCHEMA))
    prompt = tokenizer.encode("A list of numbers:", add_special_tokens=False)
    lines += [f"## Engine: {Path(args.model).name} on {engine.device} ({config.load_format}), "
              f"{args.output_len} tokens a request", "",
              "Decode steps only (prefill excluded), best of 2 runs. Constrained: every request follows "
              "`" + json.dumps(LONG_SCHEMA) + "` (it never completes, so batches stay full). Host ms "
              "a step in the sampler (its GPU kernels are queued, not waited for) and in the grammar "
              "(catching matchers up and filling the bitmask).", "",
              "| batch | free ms/step | constrained ms/step | sampler host ms/step, free → constrained "
              "| grammar host ms/step | grammar host µs/token |",
              "|---|---|---|---|---|---|"]
    run_batch(engine, prompt, SamplingParams(max_tokens=8, structured=spec), 2, timers)  # warm up
    for batch in args.batch_sizes:
        results = {}
        for name, structured in (("free", None), ("constrained", spec)):
            params = SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=0,
                                    ignore_eos=structured is None, structured=structured)
            results[name] = min(run_batch(engine, prompt, params, batch, timers) for _ in range(2))
        free, cons = results["free"], results["constrained"]
        lines.append(f"| {batch} | {free[0]:.2f} | {cons[0]:.2f} | {free[1]:.2f} → {cons[1]:.2f} | "
                     f"{cons[2]:.2f} | {cons[2] / batch * 1e3:.1f} |")
    lines.append("")


class _TimedSampler:
    """The engine's sampler, its calls timed; everything else passes through."""

    def __init__(self, inner: Any, timers: dict[str, float]) -> None:
        self.inner, self.timers = inner, timers

    def __call__(self, *a: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner(*a)
        finally:
            self.timers["sampler"] += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _time_calls(owner: Any, attr: str, timers: dict[str, float], key: str) -> None:
    """Wrap owner.attr so that its calls add their host seconds to timers[key]."""
    fn = getattr(owner, attr)

    def timed(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            timers[key] += time.perf_counter() - t0

    setattr(owner, attr, timed)


def run_batch(engine: Any, prompt: list[int], params: Any, batch: int,
              timers: dict[str, float]) -> tuple[float, float, float]:
    """ms per decode step, and the sampler's and grammar's host ms per decode step, for `batch`
    requests run to the end."""
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", prompt, params)
    engine.step()  # the prefill
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    timers.update(grammar=0.0, sampler=0.0)
    steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished_requests:
        engine.step()
        steps += 1
    sync()
    wall = (time.perf_counter() - t0) / steps * 1e3
    return wall, timers["sampler"] / steps * 1e3, timers["grammar"] / steps * 1e3


def part_check(args: argparse.Namespace, lines: list[str]) -> None:
    import jsonschema

    from sloth_serve import LLM, SamplingParams
    from sloth_serve.engine.sampling_params import StructuredSpec

    llm = LLM(args.model, device=args.device, load_format=args.load_format, num_kv_blocks=args.num_kv_blocks)
    engine = llm.engine
    engine.runner.sampler.set_tokenizer(llm.tokenizer, engine.loaded.model.config.vocab_size, engine.eos_token_ids)
    schema = {**DOC_SCHEMA, "properties": {k: v for k, v in DOC_SCHEMA["properties"].items() if k != "address"},  # type: ignore[attr-defined]
              "required": ["name", "age", "color", "tags"]}
    chat = [{"role": "user", "content": "Describe a person as JSON."}]
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                                  add_special_tokens=False)
    free_prompts = [llm.encode(p) for p in ("The json module", "Return the path", "A socket object")]
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(free_prompts, free)]
    spec = StructuredSpec(json.dumps(schema))
    params = [SamplingParams(max_tokens=200, temperature=1.0, seed=s, structured=spec) for s in range(16)]
    outs = llm.generate([prompt] * 16 + free_prompts, [*params, free, free, free])
    valid = 0
    for o in outs[:16]:
        try:
            jsonschema.validate(json.loads(o.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    unchanged = [o.token_ids for o in outs[16:]] == alone
    lines += [f"## Check on {engine.device}", "", f"- constrained outputs that parse and validate: {valid}/16",
              f"- free greedy requests unchanged beside constrained ones: {unchanged}", ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="libraries,engine")
    p.add_argument("--batch-sizes", default="1,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--vocab", type=int, default=None, help="libraries: train a BPE of this size instead of the demo's")
    p.add_argument("--lib-steps", type=int, default=300)
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--device", default="auto")
    p.add_argument("--load-format", default="unsloth")
    p.add_argument("--num-kv-blocks", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    parts: dict[str, Callable[[argparse.Namespace, list[str]], None]] = {
        "check": part_check, "libraries": part_libraries, "engine": part_engine}
    versions = package_versions("torch", "llguidance", "xgrammar")
    lines = [f"<!-- {now_iso()} {' '.join(f'{k}={v}' for k, v in versions.items())} -->", ""]
    for name in args.parts.split(","):
        parts[name](args, lines)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
