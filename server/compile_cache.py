"""Where compiled kernels are kept between starts. Triton writes each kernel variant it compiles
(and its C launcher) to a cache directory and reads it back on the next start instead of compiling
again (18 s of the 8B server's start on the H200 were prefill and sampling kernels, 8 s the LoRA
kernels); TorchInductor and Unsloth's generated modules keep theirs too. This module picks one root
for all of them, creates it, and sets each tool's variable before any of them is imported (the
engine process inherits them).

Precedence per tool: --compile-cache-dir (or $SLOTH_COMPILE_CACHE_DIR) puts every cache under it;
without it a tool's own variable already set (TRITON_CACHE_DIR, ...: the Docker image sets them
under /cache) is kept; otherwise `$XDG_CACHE_HOME/sloth-serve` (~/.cache/sloth-serve)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

# Each tool's variable and its folder under the root.
CACHE_VARS = {
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "UNSLOTH_COMPILE_LOCATION": "unsloth_compiled_cache",
}


@dataclass(frozen=True, slots=True)
class CacheDir:
    var: str  # the tool's environment variable
    path: Path
    source: str  # "--compile-cache-dir", "$TRITON_CACHE_DIR" (kept as set), or "default"


def default_root(env: Mapping[str, str] = os.environ) -> Path:
    """`$XDG_CACHE_HOME/sloth-serve`, else `~/.cache/sloth-serve` (a stable place per user)."""
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sloth-serve"


def resolve(root: str | None, env: Mapping[str, str] = os.environ) -> list[CacheDir]:
    """Each tool's cache directory by the precedence above (nothing is created)."""
    dirs = []
    for var, sub in CACHE_VARS.items():
        if root:
            dirs.append(CacheDir(var, Path(root).expanduser().absolute() / sub, "--compile-cache-dir"))
        elif env.get(var):
            dirs.append(CacheDir(var, Path(env[var]).expanduser(), f"${var}"))
        else:
            dirs.append(CacheDir(var, default_root(env).absolute() / sub, "default"))
    return dirs


def writable(path: Path) -> str | None:
    """None when `path` exists (created if need be) and a file can be written in it; else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def prepare(root: str | None, env: MutableMapping[str, str] = os.environ) -> tuple[list[CacheDir], list[str]]:
    """Create the cache directories and point each tool's variable at its own. Returns those set up
    and warnings. ValueError when --compile-cache-dir cannot be written (it was asked for); a default
    directory that cannot be is left out with a warning (the tool then uses its own default)."""
    used, warnings = [], []
    for cache in resolve(root, env):
        problem = writable(cache.path)
        if problem is None:
            env[cache.var] = str(cache.path)
            used.append(cache)
        elif cache.source == "--compile-cache-dir":
            raise ValueError(
                f"--compile-cache-dir {root}: cannot write {cache.path} ({problem}); give a writable "
                f"directory (in a container: a volume the server's user owns)"
            )
        else:
            warnings.append(
                f"compile cache {cache.path} ({cache.source}) is not writable ({problem}): kernels "
                f"compiled now are not kept for the next start; set --compile-cache-dir"
            )
    return used, warnings


def describe(used: list[CacheDir]) -> str:
    """One log line: where each cache is and how many entries it holds (one listing each, no walk: the
    cache may sit on a network volume, where a stat per file adds up)."""
    parts = []
    for cache in used:
        try:
            entries = sum(1 for _ in os.scandir(cache.path))
        except OSError:
            entries = 0
        parts.append(f"{CACHE_VARS[cache.var]} {cache.path} ({entries} entries)")
    return "compile caches: " + "; ".join(parts)
