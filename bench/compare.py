"""One device run that measures sloth-serve beside its peers on a random-weight NF4 model and writes
the table (and a plot) to --out:

    python bench/compare.py --shape llama3-8b --work /tmp/cmp --out $OUT

Stages, each a subprocess with its own time limit (a stage that fails is reported, not fatal):
  1. bench/make_random_model.py: bf16 checkpoint, its pre-quantized bnb-4bit folder, 8 rank-16 LoRAs
  2. bench/engine.py: our engine alone at batch 1/8/64, then with the 8 adapters mixed
  3. sloth-serve + bench/serve.py: through HTTP at concurrency 1/8/64, and the TTFT of a 512-token
     prompt on an idle server
  4. bench/peers.py: transformers + bitsandbytes, Unsloth default and with its decode CUDA graphs
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
    cmd = [PY, "-m", "server.cli", "--model", str(model), "--port", str(port), "--max-num-seqs", "64",
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
        base = ["--base-url", f"http://127.0.0.1:{port}/v1", "--disable-tqdm", "--vocab-size", "128000"]
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", default="model,engine,serve,peers")
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
    (args.out / "compare.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, default=str)[:4000])


if __name__ == "__main__":
    main()
