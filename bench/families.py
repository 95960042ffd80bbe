"""One device run per list of model families: for each, build its random NF4 model of a real shape
(bench/make_random_model.py), then measure our engine alone (bench/engine.py), the server through
HTTP (bench/serve.py at concurrency 1/8/64) and the peers (bench/peers.py: Unsloth's best and
default, transformers + bitsandbytes) at the same batch sizes, and write one markdown table per
family and a summary (bench/families_report.py). Every stage has its own time limit; a stage that
fails is a cell saying so, and the run goes on.

    python bench/families.py --families gemma3-4b,qwen3-30b-a3b:12:bf16 --work /tmp/fam --out $OUT/fam

A family is `shape[:layers][:bf16]` (bench/family_shapes.py names; `layers` keeps the first N decoder
layers; `bf16` writes MoE experts in 16-bit instead of Unsloth's per-expert NF4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import write_json
from bench.compare import stage, wait_ready
from bench.families_report import family_markdown, summary_markdown
from bench.family_shapes import SHAPES

PY = sys.executable
ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Model)\b: ")
# The recorded plan, about 2-2.5 minutes a family on the H200 (five processes each: build, engine, server,
# two peers); bench/gpu_record.sh splits it over two calls with FAMILIES. The named shapes first.
DEFAULT_FAMILIES = "gemma3-4b,qwen3-30b-a3b:12:bf16,gpt-oss-20b:4,olmo2-7b,phi4-mini,qwen3-8b"


@dataclass(frozen=True, slots=True)
class Family:
    shape: str
    layers: int | None
    bf16_experts: bool

    @property
    def label(self) -> str:
        return self.shape + (f"-{self.layers}l" if self.layers else "") + ("-bf16experts" if self.bf16_experts else "")

    @classmethod
    def parse(cls, text: str) -> Family:
        name, *rest = text.strip().split(":")
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
        layers = next((int(r) for r in rest if r.isdigit()), None)
        if any(r not in ("bf16",) and not r.isdigit() for r in rest):
            raise ValueError(f"{text!r}: a family is shape[:layers][:bf16]")
        return cls(name, layers, "bf16" in rest)


def route(folder: Path) -> tuple[str, str]:
    """("native" / "generic" / "refused", reason or architecture) from the folder's config.json."""
    from sloth_serve.models.families import UnsupportedModel, route_of

    cfg = json.loads((folder / "config.json").read_text())
    try:
        r = route_of(cfg)
    except UnsupportedModel as exc:
        return "refused", str(exc)
    return r.path, r.architecture


def build(fam: Family, folder: Path, log: Path, timeout: float) -> float | None:
    cmd = [PY, "bench/make_random_model.py", "--shape", fam.shape, "--out", str(folder), "--force"]
    cmd += ["--layers", str(fam.layers)] if fam.layers else []
    cmd += ["--moe-experts", "bf16"] if fam.bf16_experts else []
    start = time.perf_counter()
    return time.perf_counter() - start if stage(f"{fam.label} build", cmd, log, timeout) else None


def server_ready(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    """Whether the server answers within `timeout`; False at once when its process has exited
    (a model it cannot load) rather than at the end of the wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if wait_ready(url, 2):
            return True
    return False


def serve_runs(args: argparse.Namespace, folder: Path, vocab: int, out: Path, log: Path) -> None:
    """The server on `folder`, bench/serve.py at each concurrency; http-c<N>.json into `out`."""
    port = args.port
    cmd = [PY, "-m", "sloth_serve.cli", "--model", str(folder), "--port", str(port), "--max-num-seqs",
           str(max(args.sizes)), "--max-model-len", "1024"]
    with log.open("a") as f:
        f.write(f"\n== server: {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.perf_counter()
        if not server_ready(proc, f"http://127.0.0.1:{port}/health", args.server_timeout):
            print(f"!! server did not become ready (exit code {proc.poll()}; its log: {log})", flush=True)
            return
        write_json(out / "server.json", {"ready_s": round(time.perf_counter() - start, 1)})
        base = ["--base-url", f"http://127.0.0.1:{port}/v1", "--disable-tqdm", "--vocab-size", str(min(vocab, 128000)),
                "--input-len", str(args.input_len), "--output-len", str(args.output_len)]
        for c in args.sizes:
            extra = ["--max-concurrency", str(c), "--num-prompts", str(max(2 * c, 4))]
            stage(f"http-c{c}", [PY, "bench/serve.py", *base, *extra, "--json-out", str(out / f"http-c{c}.json"),
                                 "--label", f"http-c{c}"], log, 120)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 30 s (nothing when it has exited)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def last_error(log: Path) -> str | None:
    """The last exception line of a stage's log (what the table shows for a failed stage)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ERROR_LINE.match(ln)]
    return lines[-1][:300] if lines else None


def run_family(args: argparse.Namespace, fam: Family, deadline: float) -> Path:
    out = args.out / fam.label
    out.mkdir(parents=True, exist_ok=True)
    log = out / "run.log"
    folder = args.work / fam.label
    # gpt-oss experts are written 16-bit in transformers' layout (bench/family_shapes.py's TODO)
    bf16_experts = fam.bf16_experts or SHAPES[fam.shape].model_type == "gpt_oss"
    info: dict = {"family": fam.label, "shape": fam.shape, "layers": fam.layers, "bf16_experts": bf16_experts,
                  "source": SHAPES[fam.shape].source, "total_layers": SHAPES[fam.shape].layers}
    write_json(out / "info.json", info)
    info["build_s"] = build(fam, folder, log, args.build_timeout)
    if info["build_s"] is None:
        write_json(out / "info.json", info)
        return out
    info["route"], info["route_note"] = route(folder)
    info["disk_gb"] = round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9, 2)
    vocab = int(json.loads((folder / "config.json").read_text())["vocab_size"])
    write_json(out / "info.json", info)
    sizes = ",".join(str(b) for b in args.sizes)
    common = ["--batch-sizes", sizes]
    if info["route"] != "refused":
        ok = stage("engine", [PY, "bench/engine.py", "--model", str(folder), *common, "--input-len", str(args.input_len),
                         "--output-len", str(args.output_len), "--repeats", "1", "--json-out",
                         str(out / "engine.json")], log, args.engine_timeout)
        if not ok:
            info["engine_error"] = last_error(log)
            write_json(out / "info.json", info)
        serve_runs(args, folder, vocab, out, log)
    left = deadline - time.monotonic()
    if left > 30 and args.peers:
        budget = min(args.peers_timeout, left)
        stage("peers", [PY, "bench/peers.py", "--model", str(folder), "--peers", args.peers, *common,
                        "--prompt-len", str(args.input_len), "--new-tokens", str(args.output_len),
                        "--max-run-s", str(args.peer_max_run_s), "--time-budget-s", str(budget - 10),
                        "--out", str(out / "peers.md")], log, budget)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)  # the device disk holds one big family at a time
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=DEFAULT_FAMILIES, help=f"comma list (default {DEFAULT_FAMILIES})")
    p.add_argument("--work", type=Path, default=Path("/tmp/families"), help="where the models are built")
    p.add_argument("--out", type=Path, required=True, help="one folder per family, and families.md")
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--peers", default="unsloth-graphs,hf-bnb", help="bench/peers.py names ('' for none)")
    p.add_argument("--peer-max-run-s", type=float, default=15.0, help="a peer skips larger batches after a run this long")
    p.add_argument("--build-timeout", type=float, default=150)
    p.add_argument("--engine-timeout", type=float, default=150)
    p.add_argument("--server-timeout", type=float, default=150, help="seconds for the server to become ready")
    p.add_argument("--peers-timeout", type=float, default=150)
    p.add_argument("--time-budget-s", type=float, default=3600, help="families not started by then are skipped")
    p.add_argument("--min-family-s", type=float, default=120,
                   help="a family is not started with less than this left of --time-budget-s")
    p.add_argument("--port", type=int, default=8131)
    p.add_argument("--keep", action="store_true", help="keep each model folder (default: removed after its runs)")
    args = p.parse_args(argv)
    args.sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.family_list = [Family.parse(f) for f in args.families.split(",") if f.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.time_budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    ran = 0
    for fam in args.family_list:
        if time.monotonic() > deadline - args.min_family_s:
            print(f"!! {fam.label}: skipped, less than --min-family-s of --time-budget-s left", flush=True)
            continue
        start = time.perf_counter()
        out = run_family(args, fam, deadline)
        (out / "family.md").write_text(family_markdown(out, args))
        ran += 1
        print(f"== {fam.label}: {time.perf_counter() - start:.0f}s", flush=True)
        # After each family (a cut run keeps what ran), over every family in --out: a plan split over
        # several calls on one machine ends with one summary of them all.
        done = sorted((p.parent for p in args.out.glob("*/info.json")), key=lambda p: (p / "info.json").stat().st_mtime)
        (args.out / "families.md").write_text(summary_markdown(done, args))
    print((args.out / "families.md").read_text() if ran else "no family ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
