"""Offline decode throughput of the peers we must beat, on one model folder: transformers +
bitsandbytes NF4, Unsloth 4-bit at its default, Unsloth with its decode CUDA graphs (its best), and
both Unsloth modes with a rank-16 LoRA. Each peer runs in its own subprocess (Unsloth patches
transformers on import and reads UNSLOTH_DECODE_CUDA_GRAPHS at call time).

    python bench/peers.py --model /tmp/m8b-bnb-4bit --batch-sizes 1,8,64 --out $OUT/peers.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import append_jsonl, fmt_rate, now_iso, package_versions, read_jsonl

# name -> (table label, UNSLOTH_DECODE_CUDA_GRAPHS value, uses the LoRA adapter)
PEERS: dict[str, tuple[str, str | None, bool]] = {
    "hf-bnb": ("transformers + bitsandbytes NF4", None, False),
    "unsloth": ("Unsloth 4-bit + `for_inference` (default)", "", False),
    "unsloth-graphs": ("Unsloth 4-bit + `for_inference`, `UNSLOTH_DECODE_CUDA_GRAPHS=1` (its best)", "1", False),
    "unsloth-lora": ("Unsloth 4-bit + `for_inference` (default)", "", True),
    "unsloth-graphs-lora": ("Unsloth 4-bit + `for_inference`, `UNSLOTH_DECODE_CUDA_GRAPHS=1` (its best)", "1", True),
}
DEFAULT_PEERS = ",".join(PEERS)
VERSIONS = ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "unsloth", "unsloth_zoo")


# ---------------------------------------------------------------- worker (one peer, one process)


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def quant_of(model_dir: str) -> str:
    q = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    if q is None:
        return "bf16 folder, quantized at load"
    return f"pre-quantized {q.get('bnb_4bit_quant_type')}, double quant {q.get('bnb_4bit_use_double_quant')}"


def load_peer(peer: str, model_dir: str, adapter: str | None, device: str, max_seq_length: int):
    import torch

    if peer == "hf-bnb":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kwargs = {}
        if "quantization_config" not in json.loads((Path(model_dir) / "config.json").read_text()):
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        device_map = {"": "cuda:0" if device == "cuda" else device}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=device_map, **kwargs)
        return model.eval()
    from unsloth import FastLanguageModel

    # An adapter folder loads its base then the adapter (PeftModel + Unsloth's LoRA patches).
    model, _ = FastLanguageModel.from_pretrained(
        model_name=adapter or model_dir, max_seq_length=max_seq_length, load_in_4bit=True, dtype=None,
        local_files_only=True,
    )
    FastLanguageModel.for_inference(model)
    return model


def time_generate(model, ids, new_tokens: int, repeats: int, warmup_tokens: int) -> tuple[list[float], int]:
    """Seconds of each timed `generate` after one warmup; and the number of new tokens per row."""
    import torch

    def run(n: int):
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0, use_cache=True,
        )

    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    run(warmup_tokens)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(new_tokens)
        sync()
        times.append(time.perf_counter() - start)
    return times, out.shape[1] - ids.shape[1]


def measure(model, bs: int, args: argparse.Namespace, gen, warmup_tokens: int) -> dict:
    """One batch size: the fields of its result row (OOM propagates)."""
    import torch

    cuda = args.device.startswith("cuda")
    ids = torch.randint(3, model.config.vocab_size, (bs, args.prompt_len), generator=gen).to(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, produced = time_generate(model, ids, args.new_tokens, args.repeats, warmup_tokens)
    median = sorted(times)[len(times) // 2]
    row = {"status": "ok" if produced == args.new_tokens else "error", "times_s": [round(t, 4) for t in times],
           "time_s": round(median, 4), "tokens_per_s": bs * produced / median, "new_tokens_produced": produced,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    if produced != args.new_tokens:
        row["note"] = f"generated {produced} tokens, not {args.new_tokens}: min_new_tokens ignored?"
    return row


def worker(args: argparse.Namespace) -> int:
    """Load one peer, then measure each batch size; every outcome is a JSON line, written at once."""
    import torch

    peer, jsonl = args.worker, Path(args.jsonl)
    # The adapter given is a rebased copy in a temporary folder: record the original.
    origin = str((Path(args.adapter) / "adapter_model.safetensors").resolve().parent) if args.adapter else None
    base = {"peer": peer, "label": PEERS[peer][0], "model": args.model, "adapter": origin,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "device": device_name(args.device)}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    start = time.perf_counter()
    try:
        model = load_peer(peer, args.model, args.adapter, args.device, args.prompt_len + args.new_tokens + 64)
    except Exception as exc:
        for bs in batch_sizes:
            append_jsonl(jsonl, {**base, "batch_size": bs, "status": "oom" if is_oom(exc) else "error",
                                 "note": f"load failed: {type(exc).__name__}: {str(exc)[:300]}"})
        raise
    base.update(load_s=round(time.perf_counter() - start, 1), versions=package_versions(*VERSIONS))
    # With CUDA graphs the warmup must reach every length the timed run does, or capture gets timed.
    warmup_tokens = args.warmup_tokens or (args.new_tokens if PEERS[peer][1] == "1" else min(16, args.new_tokens))
    gen = torch.Generator().manual_seed(args.seed)
    skip_reason = None
    for bs in batch_sizes:
        row: dict = {**base, "batch_size": bs}
        if skip_reason:
            append_jsonl(jsonl, {**row, "status": "skipped", "note": skip_reason})
            continue
        try:
            row.update(measure(model, bs, args, gen, warmup_tokens))
        except Exception as exc:
            if not is_oom(exc):
                append_jsonl(jsonl, {**row, "status": "error", "note": f"{type(exc).__name__}: {str(exc)[:300]}"})
                raise
            append_jsonl(jsonl, {**row, "status": "oom", "note": str(exc)[:200]})
            skip_reason = f"out of memory at batch {bs}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        append_jsonl(jsonl, row)
        print(f"[peers] {peer} bs={bs}: {row['tokens_per_s']:.1f} tok/s ({row['time_s']:.2f}s)", file=sys.stderr,
              flush=True)
        if row["time_s"] > args.max_run_s:
            skip_reason = f"batch {bs} took {row['time_s']:.0f}s > --max-run-s {args.max_run_s:g}"
    return 0


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores)"


# ---------------------------------------------------------------- parent: one subprocess per peer


def find_adapter(model: Path) -> Path | None:
    """make_random_model.py writes adapters to <out>-loras/lora-0 (<out> without -bnb-4bit)."""
    stem = model.name.removesuffix("-bnb-4bit")
    candidate = model.with_name(stem + "-loras") / "lora-0"
    return candidate if (candidate / "adapter_config.json").is_file() else None


def rebased_adapter(adapter: Path, model: Path, tmp: Path) -> Path:
    """A copy of the adapter whose config names `model` as its base, so the LoRA rows measure the
    same base folder as the others (the weights file is linked, not copied)."""
    dst = tmp / "adapter"
    dst.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(model.resolve())
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "adapter_model.safetensors").symlink_to((adapter / "adapter_model.safetensors").resolve())
    return dst


def run_peer(peer: str, args: argparse.Namespace, jsonl: Path, adapter: Path | None, timeout: float) -> int:
    label, graphs_env, uses_lora = PEERS[peer]
    batch_sizes = args.lora_batch_sizes if uses_lora else args.batch_sizes
    cmd = [sys.executable, __file__, "--worker", peer, "--jsonl", str(jsonl), "--model", str(args.model),
           "--batch-sizes", batch_sizes, "--device", args.device, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--seed", str(args.seed),
           "--max-run-s", str(args.max_run_s), "--warmup-tokens", str(args.warmup_tokens or 0)]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
    if graphs_env is not None:
        env["UNSLOTH_DECODE_CUDA_GRAPHS"] = graphs_env  # "" = Unsloth's default (off for generate)
    print(f"[peers] === {peer} (batch {batch_sizes}) ===", file=sys.stderr, flush=True)
    before = len(read_jsonl(jsonl))
    try:
        rc = subprocess.run(cmd, env=env, timeout=timeout).returncode
        status, note = "error", f"worker exited with code {rc} (its log is above)"
    except subprocess.TimeoutExpired:
        rc, status, note = -1, "timeout", f"worker killed after {timeout:.0f}s (--time-budget-s)"
    rows = read_jsonl(jsonl)[before:]
    done = {r["batch_size"] for r in rows}
    for bs in (int(b) for b in batch_sizes.split(",")):
        if bs not in done:  # a crash or timeout: say so instead of leaving a hole
            append_jsonl(jsonl, {"peer": peer, "label": label, "batch_size": bs, "status": status, "note": note})
    return rc


def cell(rows: list[dict], peer: str, bs: int) -> str:
    for r in rows:
        if r["peer"] == peer and r["batch_size"] == bs:
            if r["status"] == "ok":
                return fmt_rate(r["tokens_per_s"])
            return {"oom": "OOM", "skipped": "–", "timeout": "timeout"}.get(r["status"], "error")
    return "–"


def adapter_desc(adapter: str | None) -> str:
    if not adapter:
        return "none"
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return f"rank {cfg['r']}, alpha {cfg['lora_alpha']}, on {', '.join(sorted(cfg['target_modules']))}"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    bss = [int(b) for b in args.batch_sizes.split(",")]
    lora_bs = int(args.lora_batch_sizes.split(",")[0])
    dev = next((r["device"] for r in rows if r.get("device")), args.device)
    vers: dict[str, str | None] = next((r["versions"] for r in rows if r.get("versions")), {})
    adapter = next((r["adapter"] for r in rows if r.get("adapter")), None)
    lines = [
        f"# Peers: offline `generate` throughput ({now_iso()})", "",
        f"Model `{args.model}` ({quant_of(str(args.model))}), {args.prompt_len}-token random prompt, "
        f"{args.new_tokens} new tokens, greedy, EOS ignored; tokens/s = batch x new tokens / time of the timed "
        f"run (after a warmup run). Device: {dev}. Versions: {', '.join(f'{k} {v}' for k, v in vers.items() if v)}. "
        f"transformers + bitsandbytes quantizes a bf16 folder with NF4, bf16 compute, no double quant; "
        f"Unsloth with its own settings (double quant). LoRA: {adapter_desc(adapter)}.", "",
        "| peer | " + " | ".join(f"bs {b}" for b in bss) + f" | bs {lora_bs} + LoRA |",
        "|---|" + "---|" * (len(bss) + 1),
    ]
    for peer in ("hf-bnb", "unsloth", "unsloth-graphs"):
        lora = {"unsloth": "unsloth-lora", "unsloth-graphs": "unsloth-graphs-lora"}.get(peer)
        cells = [cell(rows, peer, b) for b in bss] + [cell(rows, lora, lora_bs) if lora else "–"]
        lines.append(f"| {PEERS[peer][0]} | " + " | ".join(cells) + " |")
    lines += ["", "| peer | batch | status | tok/s | time s | load s | peak GiB | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = str(r.get("note", "")).replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {r['peer']} | {r['batch_size']} | {r['status']} | {fmt_rate(r.get('tokens_per_s'))} | "
            f"{r.get('time_s', '')} | {r.get('load_s', '')} | {r.get('peak_mem_gb') or ''} | {note} |"
        )
    return "\n".join(lines) + "\n"


def parent(args: argparse.Namespace) -> int:
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} has no config.json; build one with bench/make_random_model.py", file=sys.stderr)
        return 2
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := [p for p in peers if p not in PEERS]:
        print(f"error: unknown peer(s) {unknown}; choose from {list(PEERS)}", file=sys.stderr)
        return 2
    adapter = args.adapter or find_adapter(args.model)
    if adapter is None and any(PEERS[p][2] for p in peers):
        print("[peers] no LoRA adapter (--adapter, or <model>-loras/lora-0): LoRA rows skipped", file=sys.stderr)
        peers = [p for p in peers if not PEERS[p][2]]
    out: Path = args.out
    jsonl = out.with_suffix(".jsonl")
    jsonl.unlink(missing_ok=True)
    deadline = time.monotonic() + args.time_budget_s
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        rebased = rebased_adapter(adapter, args.model, Path(tmp)) if adapter else None
        for peer in peers:
            left = deadline - time.monotonic()
            if left < 10:
                append_jsonl(jsonl, {"peer": peer, "label": PEERS[peer][0], "batch_size": 0, "status": "skipped",
                                     "note": "--time-budget-s spent before it started"})
                failed += 1
                continue
            run_peer(peer, args, jsonl, rebased if PEERS[peer][2] else None, left)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(markdown(read_jsonl(jsonl), args))  # after each peer: a kill keeps what ran
    print(out.read_text())
    print(f"[peers] wrote {out} and {jsonl}", file=sys.stderr)
    # OOM and skipped batch sizes are clean outcomes; errors, crashes and timeouts are not.
    bad = [r for r in read_jsonl(jsonl) if r["status"] in ("error", "timeout")]
    return 1 if bad or failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model folder (bf16 or pre-quantized bnb-4bit)")
    p.add_argument("--adapter", type=Path, default=None, help="PEFT LoRA folder (default <model>-loras/lora-0)")
    p.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma list from: {DEFAULT_PEERS}")
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--lora-batch-sizes", default="1")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per batch size (the median is reported)")
    p.add_argument("--warmup-tokens", type=int, default=None,
                   help="new tokens of the warmup run (default: all of them with CUDA graphs, so capture is "
                        "not timed; 16 otherwise)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-run-s", type=float, default=300.0,
                   help="skip a peer's larger batch sizes once a timed run takes longer than this")
    p.add_argument("--time-budget-s", type=float, default=3600.0,
                   help="whole-run limit: a peer still running then is killed, later peers are skipped")
    p.add_argument("--out", type=Path, default=Path("peers.md"), help="markdown table; JSON lines beside it")
    p.add_argument("--worker", choices=list(PEERS), help=argparse.SUPPRESS)
    p.add_argument("--jsonl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.warmup_tokens == 0:
        args.warmup_tokens = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.model, args.adapter = str(args.model), str(args.adapter) if args.adapter else None
        return worker(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
