"""The markdown of bench/families.py: one table per family (engine alone, through HTTP, each peer, at
each batch size) from the JSON files its stages left, and a summary against issue 19's targets
(native families >= 1.5x Unsloth's best at batch 1 and 64; the generic path >= 1x at batch 64)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import fmt_rate, now_iso, package_versions, read_jsonl

PEER_LABELS = {"unsloth-graphs": "Unsloth `for_inference`, `UNSLOTH_DECODE_CUDA_GRAPHS=1` (its best)",
               "unsloth": "Unsloth `for_inference` (default)", "hf-bnb": "transformers + bitsandbytes NF4"}


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def engine_rate(out: Path, bs: int) -> float | None:
    rows = _json(out / "engine.json") or []
    return next((r["output_tok_s"] for r in rows if r["batch"] == bs and not r["adapters"]), None)


def http_rate(out: Path, bs: int) -> float | None:
    data = _json(out / f"http-c{bs}.json")
    m = data.get("metrics") if data else None
    return None if not m or m.get("failed") else float(m["output_throughput"])


def peer_cell(rows: list[dict], peer: str, bs: int) -> tuple[float | None, str]:
    """(tokens/s, the cell's text): a rate, or what happened instead."""
    for r in rows:
        if r["peer"] == peer and r["batch_size"] in (bs, 0):
            if r["status"] == "ok":
                return r["tokens_per_s"], fmt_rate(r["tokens_per_s"])
            return None, {"oom": "OOM", "skipped": "skipped", "timeout": "timeout"}.get(r["status"], "error")
    return None, "not run"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "–" if not ours or not theirs else f"{ours / theirs:.2f}x"


def _ours(rate: float | None, info: dict, ran: bool) -> str:
    if info.get("route") == "refused":
        return "refused"
    return fmt_rate(rate) if rate is not None else ("failed" if ran else "not run")


def family_markdown(out: Path, args: argparse.Namespace) -> str:
    info = _json(out / "info.json") or {}
    peers = read_jsonl(out / "peers.jsonl")
    sizes = args.sizes
    layers = info.get("total_layers")
    if info.get("layers"):
        layers = f"first {info['layers']} of {info['total_layers']}"
    server = _json(out / "server.json") or {}
    weights = "MoE experts 16-bit, the rest NF4" if info.get("bf16_experts") else "NF4 (bitsandbytes, double quant)"
    head = f"Shape of {info.get('source')} ({layers} layers), random weights, {weights}; "
    if info.get("build_s") is None:
        head += "build failed (see run.log)."
    else:
        head += f"built in {info['build_s']:.0f} s ({info.get('disk_gb')} GB on disk)."
    if "route" in info:
        head += f" Path: **{info['route']}** ({info['route_note']})."
    if server:
        head += f" Server ready {server['ready_s']} s after start."
    lines = [f"## {info.get('family', out.name)}", "", head]
    lines += ["", "| system | " + " | ".join(f"bs {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    failed = "engine_error" in info  # the server loads the same way: it failed too (its log says)
    ran_engine = (out / "engine.json").is_file() or failed
    ran_http = any(out.glob("http-c*.json")) or failed
    lines.append("| sloth-serve engine alone | " + " | ".join(_ours(engine_rate(out, b), info, ran_engine)
                                                            for b in sizes) + " |")
    lines.append("| sloth-serve through HTTP (SSE) | " + " | ".join(_ours(http_rate(out, b), info, ran_http)
                                                                  for b in sizes) + " |")
    for peer in (p for p in PEER_LABELS if any(r["peer"] == p for r in peers)):
        lines.append(f"| {PEER_LABELS[peer]} | " + " | ".join(peer_cell(peers, peer, b)[1] for b in sizes) + " |")
    best = [peer_cell(peers, "unsloth-graphs", b)[0] for b in sizes]
    lines.append("| HTTP / Unsloth's best | " + " | ".join(_ratio(http_rate(out, b), t)
                                                          for b, t in zip(sizes, best, strict=True)) + " |")
    notes = [f"- sloth-serve engine: {info['engine_error']}"] if info.get("engine_error") else []
    notes += [f"- {r['peer']} bs {r['batch_size']}: {r['status']}: {str(r.get('note', ''))[:200]}"
             for r in peers if r["status"] != "ok"]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def summary_markdown(done: list[Path], args: argparse.Namespace) -> str:
    vers = package_versions("torch", "triton", "transformers", "bitsandbytes", "unsloth")
    lo, hi = min(args.sizes), max(args.sizes)
    lines = [f"# sloth-serve per model family against its peers ({now_iso()})", "",
             "Random weights of each family's real shape, on one device (`bench/families.py "
             f"--families ...`: {', '.join(p.name for p in done)}). {args.input_len}-token prompts, {args.output_len} new tokens, greedy, "
             "EOS ignored; output tokens/s. sloth-serve through HTTP: `bench/serve.py` with that many concurrent "
             "streams (2 x as many requests); peers: offline `generate` with a static batch. Versions: "
             + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".", "",
             f"| family | path | HTTP bs {lo} | Unsloth best bs {lo} | ratio | HTTP bs {hi} | Unsloth best bs {hi} "
             "| ratio | target |", "|---|---|---|---|---|---|---|---|---|"]
    for out in done:
        info = _json(out / "info.json") or {}
        peers = read_jsonl(out / "peers.jsonl")
        h = {b: http_rate(out, b) for b in (lo, hi)}
        u = {b: peer_cell(peers, "unsloth-graphs", b)[0] for b in (lo, hi)}
        lines.append(f"| {info.get('family', out.name)} | {info.get('route', 'not built')} | "
                     f"{fmt_rate(h[lo])} | {fmt_rate(u[lo])} | {_ratio(h[lo], u[lo])} | {fmt_rate(h[hi])} | "
                     f"{fmt_rate(u[hi])} | {_ratio(h[hi], u[hi])} | {verdict(info.get('route'), h, u, lo, hi)} |")
    lines += ["", "Each family's own table (engine alone, every peer, failures with their reason) follows.", ""]
    return "\n".join(lines) + "\n" + "\n".join((out / "family.md").read_text() for out in done if
                                               (out / "family.md").is_file())


def verdict(route: str | None, h: dict[int, float | None], u: dict[int, float | None], lo: int, hi: int) -> str:
    """Issue 19: native >= 1.5x Unsloth's best at batch 1 and 64; generic >= 1x at 64."""
    if route == "native":
        if None in (h[lo], u[lo], h[hi], u[hi]):
            return "–"
        met = h[lo] >= 1.5 * u[lo] and h[hi] >= 1.5 * u[hi]  # type: ignore[operator]
        return "met (>= 1.5x)" if met else "missed (< 1.5x)"
    if route == "generic":
        if h[hi] is None or u[hi] is None:
            return "–"
        return "met (>= 1x at bs 64)" if h[hi] >= u[hi] else "missed (< 1x at bs 64)"
    return "–"
