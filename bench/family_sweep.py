"""How far the generic path reaches: for every decoder-only model type of the installed transformers
with a *ForCausalLM class that we do not serve natively, build a tiny random model (config class
defaults, a few sizes shrunk), save it with the demo tokenizer, load it through sloth_serve.LLM
(16-bit safetensors, float32) and compare its greedy tokens with transformers' generate.

    python bench/family_sweep.py --out bench/results/family-sweep-cpu.md [--only olmo3,seed_oss] [--timeout 240]

Each family runs in a forked child with its own time limit, so a hang or a crash costs one row.
Verdicts: equal; differs (first prompt that does, and where); refused (sloth-serve's one-line reason,
from config.json or at load); crash (the exception); skipped (encoder, encoder-decoder, multimodal,
native family, or transformers cannot build or run the tiny model itself). CPU only; not run in CI.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

VOCAB = 4096  # the demo tokenizer's
MAX_TOKENS = 8
# Sizes shrunk wherever the config class takes them (by name or through its attribute_map); every
# other field keeps the class default, so the sweep sees each family as transformers builds it.
TINY: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.3,
    # mixtures of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_k=2, moe_intermediate_size=32, shared_expert_intermediate_size=48, n_shared_experts=1,
    moe_num_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, num_shared_experts=1,
    # multi-head latent attention
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    # other names for the same sizes
    n_embd=64, n_layer=4, n_head=4, n_positions=256, n_inner=96, d_model=64, ffn_dim=96, rotary_dim=8,
    num_layers=4, n_ctx=256, ffn_hidden_size=96, kv_channels=16,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# Fields whose defaults assume the full depth.
FAMILY_EXTRA: dict[str, dict[str, Any]] = {"gpt_neo": dict(attention_types=[[["global", "local"], 2]]),
                                           "zaya": dict(num_experts_per_tok=1),
                                           "gemma3n_text": dict(  # per-layer lists and KV sharing at 4 layers
                                               layer_types=["sliding_attention", "full_attention"] * 2,
                                               intermediate_size=[96] * 4, num_kv_shared_layers=2,
                                               vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                                               activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], laurel_rank=4)}
SUB_MODELS = ("vision_config", "audio_config", "text_encoder", "audio_encoder", "decoder", "encoder",
              "depth_decoder", "vq_config")


@dataclass(frozen=True, slots=True)
class Row:
    family: str
    architecture: str
    verdict: str  # equal / differs / refused / crash / skipped
    detail: str = ""
    seconds: float = 0.0


def causal_lm_families() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {k: v for k, v in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()) if v.endswith("ForCausalLM")}


def skip_reason(family: str, arch: str) -> str | None:
    """Why the sweep leaves a family out (None: it runs it)."""
    from transformers import CONFIG_MAPPING

    from sloth_serve.models.config import SUPPORTED_ARCHITECTURES

    config_cls = CONFIG_MAPPING[family]
    params = inspect.signature(config_cls.__init__).parameters
    if arch in SUPPORTED_ARCHITECTURES:
        return "native family"
    if "is_decoder" in params and "add_cross_attention" in params:
        return "an encoder stack (BERT-like) that can be run as a decoder"
    if "decoder_layers" in params:
        return "the decoder of an encoder-decoder model"
    subs = set(getattr(config_cls, "sub_configs", {}) or {})
    if subs & set(SUB_MODELS):
        return f"multimodal or audio ({', '.join(sorted(subs & set(SUB_MODELS)))})"
    return None


def tiny_config(family: str) -> Any:
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[family]
    params = inspect.signature(config_cls.__init__).parameters
    names = set(params) | set(getattr(config_cls, "attribute_map", {}) or {})
    kwargs = {k: v for k, v in TINY.items() if k in names}
    if "kv_lora_rank" in params:  # multi-head latent attention: its head sizes are the qk_*/v_* ones
        kwargs.pop("head_dim", None)
        if "num_key_value_heads" in kwargs:  # and every head its own keys
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs.update(FAMILY_EXTRA.get(family, {}))
    mapped = getattr(config_cls, "attribute_map", {}) or {}
    for alias, real in mapped.items():  # one value per real field (n_embd and hidden_size are the same)
        if alias in kwargs and real in kwargs:
            del kwargs[alias]
    window = params.get("sliding_window")
    if window is not None and isinstance(window.default, int):  # a window the prompts outgrow
        kwargs["sliding_window"] = 16
    return config_cls(**kwargs)


def build(folder: Path, config: Any) -> Any:
    """The tiny model saved in `folder` with the demo tokenizer; transformers' instance (the reference)."""
    import torch
    import transformers

    from sloth_serve.loader import DEMO_MODEL

    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    except (ValueError, TypeError):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.float().eval()
    with torch.no_grad():  # random biases and norms so that those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_MODEL / name, folder / name)
    return model


def prompts() -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 37, 12)]


def reference(model: Any, prompt: list[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=MAX_TOKENS)
    return [int(t) for t in out[0, len(prompt):].tolist()]


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def sweep_family(family: str, arch: str) -> Row:
    """Build, reference, route, load, generate, compare: one family's row."""
    from sloth_serve import LLM
    from sloth_serve.engine.sampling_params import SamplingParams
    from sloth_serve.models.families import UnsupportedModel, route_of

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"sweep-{family}-") as tmp:
        folder = Path(tmp) / family
        try:
            config = tiny_config(family)
        except Exception as exc:  # transformers' own checks reject the tiny sizes
            return Row(family, arch, "skipped", f"transformers: {one_line(exc)}", time.perf_counter() - start)
        try:  # what the start-up checks say from config.json alone, before any weight exists
            route_of({**json.loads(config.to_json_string()), "architectures": [arch]})
        except UnsupportedModel as exc:
            return Row(family, arch, "refused", f"config.json: {exc}", time.perf_counter() - start)
        try:
            hf = build(folder, config)
        except Exception as exc:  # transformers itself cannot build it at this size
            return Row(family, arch, "skipped", f"transformers: {one_line(exc)}", time.perf_counter() - start)
        try:
            want = [reference(hf, p) for p in prompts()]
        except Exception as exc:  # nor run it
            return Row(family, arch, "skipped", f"transformers: {one_line(exc)}", time.perf_counter() - start)
        try:
            llm = LLM(folder, load_format="safetensors", dtype="float32", num_kv_blocks=64, block_size=8,
                      max_num_batched_tokens=24)
        except UnsupportedModel as exc:
            return Row(family, arch, "refused", f"at load: {exc}", time.perf_counter() - start)
        except Exception as exc:
            return Row(family, arch, "crash", f"at load: {one_line(exc)}", time.perf_counter() - start)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        try:
            got = [out.token_ids for out in llm.generate(prompts(), params)]
        except Exception as exc:
            return Row(family, arch, "crash", f"generating: {one_line(exc)}", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w or len(g) != MAX_TOKENS:
            at = next((j for j, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), min(len(g), len(w)))
            return Row(family, arch, "differs", f"prompt {i} ({len(prompts()[i])} tokens) from token {at}: "
                                                f"{g} vs transformers {w}", seconds)
    return Row(family, arch, "equal", "", seconds)


def _child(family: str, arch: str, conn: Any) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)  # transformers' and the loader's chatter: the row says it all
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        row = sweep_family(family, arch)
    except BaseException as exc:  # anything unexpected is still a row
        row = Row(family, arch, "crash", one_line(exc) + " | " + traceback.format_exc().splitlines()[-2].strip())
    conn.send(row)
    conn.close()


def run_one(family: str, arch: str, timeout: float) -> Row:
    """The family in a forked child (imports already done here); a child past `timeout` is ended."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(family, arch, child))
    start = time.perf_counter()
    proc.start()
    child.close()
    row: Row | None = None
    if parent.poll(timeout):
        try:
            row = parent.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if row is None:
        seconds = time.perf_counter() - start
        what = f"timed out after {timeout:.0f}s" if seconds >= timeout else f"child died (exit code {proc.exitcode})"
        row = Row(family, arch, "crash", what, seconds)
    return row


def markdown(rows: list[Row], skipped: list[Row], transformers_version: str) -> str:
    counts = {v: sum(1 for r in rows if r.verdict == v) for v in ("equal", "differs", "refused", "crash", "skipped")}
    lines = [
        "# Generic-path family sweep (CPU, float32)",
        "",
        f"`python bench/family_sweep.py` with transformers {transformers_version}: every decoder-only model type with",
        "a *ForCausalLM class and no native model code here, as a tiny random model (config class defaults; hidden 64,",
        f"4 layers, vocabulary {VOCAB}, 4 experts where it has experts), loaded through `sloth_serve.LLM` from 16-bit",
        "safetensors and compared with transformers' greedy `generate` on 3 prompts of 5, 37 and 12 tokens,",
        f"{MAX_TOKENS} new tokens each (chunked prefill at 24 tokens a step, the three in one batch).",
        "",
        "Summary: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(rows)} swept families; "
        f"{len(skipped)} left out (below).",
        "",
        "| family | class | verdict | reason / detail | s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| {r.family} | {r.architecture} | {r.verdict} | {detail} | {r.seconds:.1f} |")
    lines += ["", "Left out of the sweep:", "", "| family | class | why |", "|---|---|---|"]
    lines += [f"| {r.family} | {r.architecture} | {r.detail} |" for r in skipped]
    return "\n".join(lines) + "\n"


def merge(rows: list[Row], saved: Path) -> list[Row]:
    """The saved run's rows, those of `rows`' families replaced by `rows`."""
    new = {r.family: r for r in rows}
    old = [Row(**r) for r in json.loads(saved.read_text())] if saved.is_file() else []
    kept = [new.pop(r.family, r) for r in old]
    return sorted(kept + list(new.values()), key=lambda r: r.family)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="markdown table to write (default: print it)")
    parser.add_argument("--only", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per family")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # noqa: F401  (imported once here, shared by every forked child)
    import transformers

    import sloth_serve.llm  # noqa: F401

    only = {f.strip() for f in args.only.split(",") if f.strip()}
    rows: list[Row] = []
    skipped: list[Row] = []
    for family, arch in causal_lm_families().items():
        if only and family not in only:
            continue
        reason = skip_reason(family, arch)
        if reason is not None:
            skipped.append(Row(family, arch, "left out", reason))
            continue
        row = run_one(family, arch, args.timeout)
        print(f"{row.family:28s} {row.verdict:8s} {row.seconds:6.1f}s {row.detail[:200]}", flush=True)
        rows.append(row)
    every = rows + skipped
    if args.out and only:  # a partial run updates those families' rows of the last full one
        every = merge(every, args.out.with_suffix(".json"))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in every], indent=1) + "\n")
    rows = [r for r in every if r.verdict != "left out"]
    text = markdown(rows, [r for r in every if r.verdict == "left out"], transformers.__version__)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
