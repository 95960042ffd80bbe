"""What a model or adapter folder is, read from its JSON files alone (no torch): shared by the
loader and the start-up checks (server/preflight.py), which run before torch is imported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError saying what is wrong when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def is_adapter_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def resolve_adapter_base(adapter: Path) -> Path:
    """The local folder of the base model an adapter names (relative to the adapter folder, or to
    the working directory). Never the network: a hub id that is not on disk is an error."""
    cfg = read_json_object(adapter / "adapter_config.json")
    base = cfg.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise ValueError(f"{adapter}/adapter_config.json does not name its base model; "
                         f"pass --model <base folder> --lora NAME={adapter}")
    for candidate in (Path(base).expanduser(), adapter / base):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"adapter {adapter} was trained on {base!r}, which is not a local folder (sloth-serve never "
        f"downloads). Put the base model on disk and pass --model <that folder> --lora NAME={adapter}"
    )
