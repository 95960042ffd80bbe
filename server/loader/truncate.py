"""A draft model for speculative decoding cut from a model: its first N decoder layers, with its
embeddings, final norm, head and tokenizer (16-bit safetensors folders of Llama-style models).

    python -m sloth_serve.loader.truncate MODEL_FOLDER DRAFT_FOLDER --layers 2

Its proposals are weaker than a draft trained for the job, but it shares the tokenizer exactly and
costs nothing to make (the tests and bench/spec_acceptance.py use one made from the demo model).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def truncate_model(src: str | Path, dst: str | Path, num_layers: int) -> Path:
    """Write `src`'s first `num_layers` layers as a model folder at `dst`; returns `dst`."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src} is quantized: truncate its 16-bit checkpoint (the draft loads in 4-bit with "
                         "--load-format unsloth)")
    total = int(config["num_hidden_layers"])
    if not 1 <= num_layers <= total:
        raise ValueError(f"--layers must be in [1, {total}] for {src}; got {num_layers}")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src} holds no *.safetensors")
    tensors = {}
    for file in files:
        for name, tensor in load_file(file).items():
            match = _LAYER.search(name)
            if match is None or int(match.group(1)) < num_layers:
                tensors[name] = tensor
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = num_layers
    for key in ("layer_types",):  # per-layer lists follow the layers kept
        if isinstance(config.get(key), list):
            config[key] = config[key][:num_layers]
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json",) \
                and not extra.name.endswith(".index.json"):
            shutil.copy2(extra, dst / extra.name)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="16-bit model folder")
    parser.add_argument("dst", help="folder to write the draft model to")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers kept (the first ones)")
    args = parser.parse_args(argv)
    print(truncate_model(args.src, args.dst, args.layers))


if __name__ == "__main__":
    main()
