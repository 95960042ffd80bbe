"""Names of LoRA adapters as clients use them (`model: NAME`), mapped to engine adapter ids.

Adapters come from `--lora NAME=PATH` (pinned: never evicted), from `POST /v1/load_lora_adapter`,
or from a `--lora-dir`: every adapter folder under it is servable by its folder name, loaded on its
first request, reloaded when its files change on disk, and evicted least recently used beyond
`--max-cpu-loras`. Names are confined to their directory: no separators, no `..`, no symlinks out.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class Adapter:
    name: str
    path: str
    adapter_id: int
    rank: int  # 0 until the engine has loaded it
    pinned: bool = False  # from --lora: never evicted
    signature: tuple[float, ...] = ()  # mtimes of its files when loaded (to notice a new checkpoint)
    last_used: float = field(default_factory=time.monotonic)


def file_signature(folder: Path) -> tuple[float, ...]:
    names = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
             # what its requests are tokenized and templated with (server/api/tokenizers.py)
             "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
    return tuple((folder / n).stat().st_mtime if (folder / n).exists() else 0.0 for n in names)


def confined_adapter_dir(root: Path, name: str) -> Path | None:
    """root/name if `name` is a plain folder name whose real path stays inside root and holds an
    adapter; None otherwise (the caller answers 404). Nothing outside root is read."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        return None
    real_root = root.resolve()
    candidate = (root / name).resolve()
    if not candidate.is_relative_to(real_root) or candidate == real_root:
        return None
    return candidate if (candidate / "adapter_config.json").is_file() else None


# Several front ends share one engine (--api-server-count): each names the --lora adapters in the
# same order, so they get the same ids everywhere (the engine loads each once); what one front end
# loads while serving (a --lora-dir adapter on its first request there, or through
# /v1/load_lora_adapter) takes an id from its own range, so two front ends never give one id to
# different folders. The engine tells the others of what comes through /v1/load_lora_adapter.
DYNAMIC_ID_SPAN = 1 << 20


def dynamic_ids_from(front_end_index: int | None) -> int | None:
    """The first id of the adapters a front end loads while serving; None with one front end (all
    adapters share one count)."""
    return None if front_end_index is None else (front_end_index + 1) * DYNAMIC_ID_SPAN


class AdapterRegistry:
    """Names to adapter ids only: the engine holds the weights (an EngineClient's add_lora, or
    `LocalAdapters` for the offline LLM, whose engine is at hand)."""

    def __init__(self, lora_dirs: tuple[str, ...] = (), max_cpu_loras: int = 0,
                 dynamic_ids: int | None = None) -> None:
        self.lora_dirs = tuple(Path(d) for d in lora_dirs)
        self.max_cpu_loras = max_cpu_loras  # 0: no limit
        self.by_name: dict[str, Adapter] = {}
        self._ids = itertools.count(1)
        # Unpinned adapters' ids, where they must differ from other front ends' (dynamic_ids_from)
        self._dynamic_ids = itertools.count(dynamic_ids) if dynamic_ids is not None else self._ids

    def prepare(self, name: str, path: str | Path, pinned: bool = False, at_startup: bool = False) -> Adapter:
        """A new adapter id for the folder (nothing read but its files' times); not servable yet.
        `at_startup`: a --lora adapter, whose id every front end gives alike."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid adapter name {name!r}: use a plain name without '/'")
        adapter_id = next(self._ids if at_startup else self._dynamic_ids)
        return Adapter(name, str(path), adapter_id, 0, pinned, file_signature(Path(path)))

    def commit(self, adapter: Adapter) -> Adapter | None:
        """Make the adapter servable once the engine holds its weights. Returns the adapter it
        replaced, whose weights the caller drops from the engine."""
        old = self.by_name.get(adapter.name)
        self.by_name[adapter.name] = adapter
        return old

    def unregister(self, name: str) -> Adapter:
        """Forget the name now; the caller drops its weights from the engine."""
        return self.by_name.pop(name)

    def get(self, name: str) -> Adapter | None:
        adapter = self.by_name.get(name)
        if adapter is not None:
            adapter.last_used = time.monotonic()
        return adapter

    def find_in_dirs(self, name: str) -> Path | None:
        for root in self.lora_dirs:
            folder = confined_adapter_dir(root, name)
            if folder is not None:
                return folder
        return None

    def is_stale(self, adapter: Adapter) -> bool:
        """A --lora-dir adapter whose files changed since it was loaded (a trainer wrote a new one)."""
        folder = Path(adapter.path)
        if adapter.pinned or not any(folder.parent.resolve() == r.resolve() for r in self.lora_dirs):
            return False
        try:
            return file_signature(folder) != adapter.signature
        except OSError:
            return False

    def allowed_path(self, path: str) -> Path:
        """A runtime-loaded adapter must live inside a --lora-dir."""
        real = Path(path).resolve()
        for root in self.lora_dirs:
            if real.is_relative_to(root.resolve()) and real != root.resolve():
                return real
        raise PermissionError(
            f"adapter path {path!r} is outside the allowed directories; start the server with "
            "--lora-dir <directory holding it>"
        )

    def evictable(self) -> list[Adapter]:
        """Unpinned adapters beyond --max-cpu-loras, least recently used first."""
        if not self.max_cpu_loras:
            return []
        unpinned = sorted((a for a in self.by_name.values() if not a.pinned), key=lambda a: a.last_used)
        return unpinned[: max(len(unpinned) - self.max_cpu_loras, 0)]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.by_name.values()))
