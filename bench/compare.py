"""One device run that measures sloth-serve beside its peers on a random-weight NF4 model and writes
the table (and a plot) to --out:

    python bench/compare.py --shape llama3-8b --work /tmp/cmp --out $OUT

Stages, each a subprocess with its own time limit (a stage that fails is reported, not fatal):
  1. bench/make_random_model.py: bf16 checkpoint, its pre-quantized bnb-4bit folder, 8 rank-16 LoRAs
  2. bench/engine.py: our engine alone at batch 1/8/64, then with the 8 adapters mixed
  3. sloth-serve + bench/serve.py: through HTTP at concurrency 1/8/64, and the TTFT of a 512-token
     prompt on an idle server
  4. bench/peers.py: transformers + bitsandbytes, Unsloth default and with its decode CUDA graphs
  5. report: compare.md (one table of every figure, the targets) and compare.png, from the JSON files
     the stages wrote into --out (`--stages report` redoes it from an earlier run's files)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import fmt_rate, now_iso, package_versions
from bench.make_random_model import SHAPES

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def stage(name: str, cmd: list[str], log: Path, timeout: float) -> bool:
    start = time.perf_counter()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    with log.open("a") as f:
        f.write(f"\n== {name}: {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = -1
            f.write(f"!! {name} timed out after {timeout:.0f}s\n")
    print(f"== {name}: rc {rc} in {time.perf_counter() - start:.0f}s", flush=True)
    return rc == 0


def wait_ready(url: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except Exception:
            time.sleep(1)
    return False


def serve_stage(args: argparse.Namespace, model: Path, loras: list[Path], log: Path) -> list[dict]:
    port = 8123
    cmd = [PY, "-m", "sloth_serve.cli", "--model", str(model), "--port", str(port), "--max-num-seqs", "64",
           "--max-model-len", "1024", "--max-loras", "8"]
    for i, lora in enumerate(loras):
        cmd += ["--lora", f"lora{i}={lora}"]
    with log.open("a") as f:
        f.write(f"\n== server: {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    rows: list[dict] = []
    try:
        if not wait_ready(f"http://127.0.0.1:{port}/health", args.server_timeout):
            print("!! server did not become ready", flush=True)
            return rows
        vocab = str(min(SHAPES[args.shape].vocab, 128000))
        base = ["--base-url", f"http://127.0.0.1:{port}/v1", "--disable-tqdm", "--vocab-size", vocab]
        runs = [(f"http-c{c}", ["--input-len", "64", "--output-len", "128", "--max-concurrency", str(c),
                                "--num-prompts", str(max(2 * c, 8))]) for c in (1, 8, 64)]
        if loras:
            names = ",".join(f"lora{i}" for i in range(len(loras)))
            runs.append(("http-c64-8lora", ["--input-len", "64", "--output-len", "128", "--max-concurrency", "64",
                                            "--num-prompts", "128", "--lora-names", names]))
        runs.append(("ttft-512", ["--input-len", "512", "--output-len", "8", "--max-concurrency", "1",
                                  "--num-prompts", "10"]))
        for label, extra in runs:
            out = args.out / f"{label}.json"
            if stage(label, [PY, "bench/serve.py", *base, *extra, "--json-out", str(out), "--label", label], log, 240):
                rows.append({"label": label, **json.loads(out.read_text())})
        # The server's own figures after the runs (CUDA-event forward time per step, TTFT, KV use).
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                (args.out / "metrics.txt").write_bytes(r.read())
        except OSError as exc:
            print(f"!! /metrics scrape failed: {exc}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rate(x: float | None) -> str:
    return "–" if x is None else fmt_rate(x)


def _metric_sum(text: str, name: str) -> tuple[float, float] | None:
    """(sum, count) of a histogram in a Prometheus text scrape, over all its label sets."""
    total, count, seen = 0.0, 0.0, False
    for line in text.splitlines():
        if line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
        elif line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
    return (total, count) if seen else None


def report(out: Path, shape: str, argv: list[str]) -> str:
    """compare.md from the JSON the stages left in `out` (and compare.png when matplotlib is there)."""
    engine = json.loads((out / "engine.json").read_text()) if (out / "engine.json").is_file() else []
    http = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("http-*.json"))}
    ttft = json.loads((out / "ttft-512.json").read_text()) if (out / "ttft-512.json").is_file() else None
    peers = [r for r in _read_jsonl(out / "peers.jsonl") if r.get("status") == "ok"]
    eng = {(r["batch"], r["adapters"] > 0): r for r in engine}
    sizes = (1, 8, 64)

    def engine_cell(bs: int, lora: bool) -> str:
        r = eng.get((bs, lora))
        return "–" if r is None else f"{fmt_rate(r['output_tok_s'])} ({fmt_rate(r['decode_tok_s'])})"

    def http_rate(label: str) -> float | None:
        m = http.get(label, {}).get("metrics")
        return None if not m or m.get("failed") else m["output_throughput"]

    def peer_rate(peer: str, bs: int) -> float | None:
        return next((r["tokens_per_s"] for r in peers if r["peer"] == peer and r["batch_size"] == bs), None)

    gpu = next((r.get("device") for r in peers if r.get("device")), None)
    vers = package_versions("torch", "triton", "transformers", "bitsandbytes", "unsloth", "llguidance")
    lines = [
        f"# sloth-serve against its peers, {shape} shape, random NF4 weights ({now_iso()[:10]})", "",
        f"Device: {gpu or 'see compare.log'}. Versions (this process): "
        + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".",
        f"Command: `python bench/compare.py {' '.join(argv)}` (every figure below from this one run).", "",
        "Output tokens/s; 64-token prompts, 128 new tokens, greedy, EOS ignored. Engine cells: output "
        "tok/s over the whole run (decode-only tok/s in brackets). HTTP: `bench/serve.py` against the "
        "server with that many concurrent streaming requests (2 x concurrency requests, at least 8). "
        "Peers: offline `generate` with a static batch of that size, LoRA column at batch 1 with one adapter.", "",
        "| system | 1 | 8 | 64 | 64, 8 rank-16 adapters mixed |", "|---|---|---|---|---|",
        "| sloth-serve engine alone | " + " | ".join(engine_cell(b, False) for b in sizes)
        + f" | {engine_cell(64, True)} |",
        "| sloth-serve through HTTP (SSE) | " + " | ".join(_rate(http_rate(f"http-c{b}")) for b in sizes)
        + f" | {_rate(http_rate('http-c64-8lora'))} |",
    ]
    labels = {"hf-bnb": "transformers + bitsandbytes", "unsloth": "Unsloth `for_inference` (default)",
              "unsloth-graphs": "Unsloth, `UNSLOTH_DECODE_CUDA_GRAPHS=1`"}
    for peer, label in labels.items():
        lora = {"unsloth": "unsloth-lora", "unsloth-graphs": "unsloth-graphs-lora"}.get(peer)
        lora_cell = f"{_rate(peer_rate(lora, 1))} (bs 1, 1 adapter)" if lora else "–"
        lines.append(f"| {label} | " + " | ".join(_rate(peer_rate(peer, b)) for b in sizes) + f" | {lora_cell} |")

    base1 = eng.get((1, False), {}).get("decode_tok_s")
    base64, lora64 = eng.get((64, False), {}).get("output_tok_s"), eng.get((64, True), {}).get("output_tok_s")
    h64, hl64 = http_rate("http-c64"), http_rate("http-c64-8lora")
    ttft_ms = ttft["metrics"]["ttft_ms"]["p50"] if ttft and not ttft["metrics"].get("failed") else None
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "missed")

    def target(name: str, value: float | None, fmt: str, ok: bool | None) -> None:
        lines.append(f"| {name} | {'–' if value is None else fmt.format(value)} | {verdict(ok)} |")

    target("batch-1 decode >= 650 tok/s (engine)", base1, "{:,.0f} tok/s", None if base1 is None else base1 >= 650)
    target(">= 12,000 output tok/s at 64 streams through HTTP", h64, "{:,.0f} tok/s", None if h64 is None else h64 >= 12000)
    cost = None if not (base64 and lora64) else 100 * (1 - lora64 / base64)
    target("8 mixed adapters cost <= 15% (engine, batch 64)", cost, "{:.0f}%", None if cost is None else cost <= 15)
    hcost = None if not (h64 and hl64) else 100 * (1 - hl64 / h64)
    target("8 mixed adapters cost <= 15% (HTTP, 64 streams)", hcost, "{:.0f}%", None if hcost is None else hcost <= 15)
    over = None if not (h64 and base64) else 100 * (1 - h64 / base64)
    target("HTTP within 5% of engine alone at 64 streams", over, "{:.1f}% below", None if over is None else over <= 5)
    target("TTFT of a 512-token prompt, idle server <= 30 ms (p50)", ttft_ms, "{:.1f} ms",
           None if ttft_ms is None else ttft_ms <= 30)
    for label, data in sorted(http.items()):
        m = data.get("metrics", {})
        if m and not m.get("failed"):
            lines.append("")
            lines.append(f"`{label}`: TTFT p50 {m['ttft_ms']['p50']:.1f} / p99 {m['ttft_ms']['p99']:.1f} ms, TPOT p50 "
                         f"{m['tpot_ms']['p50']:.2f} ms, ITL p99 {m['itl_ms']['p99']:.2f} ms, E2E p50 "
                         f"{m['e2e_ms']['p50']:.0f} ms, {m['output_throughput']:,.0f} tok/s, client CPU "
                         f"{m.get('client_cpu_percent', 0):.0f}%.")
    if ttft:
        m = ttft["metrics"]
        lines += ["", f"`ttft-512`: TTFT p50 {m['ttft_ms']['p50']:.1f} / p99 {m['ttft_ms']['p99']:.1f} ms."]
    scrape = out / "metrics.txt"
    if scrape.is_file():
        fwd = _metric_sum(scrape.read_text(), "sloth:step_forward_time_seconds")
        if fwd and fwd[1]:
            lines += ["", f"Server `/metrics` after the HTTP runs: {fwd[1]:,.0f} engine steps timed with CUDA events, "
                      f"mean forward time {1000 * fwd[0] / fwd[1]:.2f} ms (`sloth:step_forward_time_seconds`; "
                      "the scrape is metrics.txt beside this file when kept)."]
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    _plot(out / "compare.png", shape, sizes, eng, http_rate, peer_rate, labels)
    return text


def _plot(path: Path, shape: str, sizes: tuple[int, ...], eng: dict, http_rate, peer_rate, labels: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {"sloth-serve engine": [eng.get((b, False), {}).get("output_tok_s") for b in sizes],
              "sloth-serve HTTP": [http_rate(f"http-c{b}") for b in sizes]}
    series.update({label: [peer_rate(peer, b) for b in sizes] for peer, label in labels.items()})
    for name, ys in series.items():
        pts = [(b, y) for b, y in zip(sizes, ys, strict=True) if y]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name.replace("`", ""))
    ax.set(xscale="log", yscale="log", xlabel="batch size / concurrent streams", ylabel="output tokens/s",
           title=f"{shape}, NF4, 64-token prompts, 128 new tokens")
    ax.set_xticks(list(sizes), [str(b) for b in sizes])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", default="model,engine,serve,peers,report")
    ap.add_argument("--peers", default="unsloth-graphs,hf-bnb,unsloth,unsloth-graphs-lora")
    ap.add_argument("--peer-batch-sizes", default="1,8,64")
    ap.add_argument("--server-timeout", type=float, default=240)
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "compare.log"
    bf16 = args.work / "model"
    bnb = args.work / "model-bnb-4bit"
    lora_dir = args.work / "model-loras"
    if "model" in stages:
        stage("model", [PY, "bench/make_random_model.py", "--shape", args.shape, "--out", str(bf16), "--force",
                        "--quantize-bnb", "--bnb-out", str(bnb), "--lora", "8", "--lora-out", str(lora_dir)], log, 400)
    loras = sorted(lora_dir.glob("lora-*"))
    results: dict[str, object] = {"shape": args.shape}
    if "engine" in stages:
        out = args.out / "engine.json"
        if stage("engine", [PY, "bench/engine.py", "--model", str(bnb), "--batch-sizes", "1,8,64",
                            "--lora", *map(str, loras), "--json-out", str(out), "--out", str(args.out / "engine.md")],
                 log, 400):
            results["engine"] = json.loads(out.read_text())
    if "serve" in stages:
        results["http"] = serve_stage(args, bnb, loras, log)
    if "peers" in stages:
        stage("peers", [PY, "bench/peers.py", "--model", str(bnb), "--adapter", str(loras[0]) if loras else "",
                        "--peers", args.peers, "--batch-sizes", args.peer_batch_sizes,
                        "--out", str(args.out / "peers.md")], log, 900)
    if stages - {"report"}:
        (args.out / "compare.json").write_text(json.dumps(results, indent=1, default=str))
    print(report(args.out, args.shape, sys.argv[1:]))


if __name__ == "__main__":
    main()
