"""Helpers shared by the benchmark scripts: percentiles, package versions, number formatting and
writing results. Standard library only, so the serving client stays light."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import itertools
import json
import math
import os
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float], percentiles: Sequence[float] = (50, 99)) -> dict[str, float]:
    """mean, std and the asked percentiles (keys 'p50', 'p99', ...) of `values`."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n) if n else math.nan
    out = {"mean": mean, "std": std}
    for q in percentiles:
        out[f"p{q:g}"] = percentile(values, q)
    return out


def package_versions(*names: str) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def fmt_rate(x: float | None) -> str:
    """Throughput for a table: '22.4', '139', '4,748'."""
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def json_safe(x: Any) -> Any:
    """nan / inf (a metric of no samples, an unlimited rate) as null: strict JSON has neither."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def synthetic_words() -> Iterator[str]:
    """'ba', 'be', ..., 'bako', ..., 'bakosu', ...: pronounceable, distinct, one regex word each. The
    random models' word tokenizer maps each to one id, so the serving client's chat prompts built
    from them have a known token count there."""
    syllables = [c + v for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"]
    for n in (1, 2, 3, 4):
        for combo in itertools.product(syllables, repeat=n):
            yield "".join(combo)
