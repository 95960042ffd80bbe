"""Broken adapter folders against the real server: a --lora-dir holding them starts, a request naming
one gets a 400 saying what is wrong (never a 500, never a dead engine), and the next requests for
the base and the good adapters succeed; a bad --lora folder is a one-line error and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from live_server import REPO, LiveServer, free_port, launch
from safetensors.torch import load_file, save_file

from sloth_serve.loader import DEMO_ADAPTER

Tensors = dict[str, torch.Tensor]


def first(t: Tensors, part: str) -> str:
    return next(k for k in sorted(t) if f".{part}." in k)


def adapter(root: Path, name: str, config: dict | None = None, raw_config: str | None = None,
            tensors: Callable[[Tensors], Tensors] | None = None) -> Path:
    folder = root / name
    shutil.copytree(DEMO_ADAPTER, folder)
    cfg = {**json.loads((folder / "adapter_config.json").read_text()), **(config or {})}
    cfg = {k: v for k, v in cfg.items() if v != "DROP"}
    (folder / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(cfg))
    if tensors is not None:
        path = folder / "adapter_model.safetensors"
        save_file(tensors(load_file(str(path))), str(path))
    return folder


def b_rank(t: Tensors) -> Tensors:
    key = first(t, "lora_B")
    return {**t, key: t[key][:, :4].contiguous()}


# folder name -> (how it is broken, what the 400 says)
BAD: dict[str, tuple[dict, str]] = {
    "b-rank": ({"tensors": b_rank}, "lora_A has rank 8 but its lora_B has rank 4"),
    "r-zero": ({"config": {"r": 0}}, "r=0 is not a rank"),
    "r-null": ({"config": {"r": None}}, "r=null is not a rank"),
    "r-missing": ({"config": {"r": "DROP"}}, "has no `r`"),
    "r-string": ({"config": {"r": "8"}}, 'r="8" is not a rank'),
    "rank-pattern-1e9": ({"config": {"rank_pattern": {"q_proj": 10**9}}}, "says 1000000000 (rank_pattern)"),
    "int-tensors": ({"tensors": lambda t: {k: (v * 100).to(torch.int32) for k, v in t.items()}},
                    "is of dtype I32"),
    "other-base": ({"tensors": lambda t: {k: torch.cat([v, v], 1) if ".lora_A." in k else v for k, v in t.items()}},
                   "does not fit this model"),
    "unknown-module": ({"config": {"target_modules": ["fc1", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
                        "tensors": lambda t: {k.replace("q_proj", "fc1"): v for k, v in t.items()}},
                       "targets model.layers.0.self_attn.fc1, which the model lacks"),
    "dora": ({"config": {"use_dora": True}}, "use_dora=true is a DoRA adapter"),
    "list-config": ({"raw_config": "[]"}, "holds a JSON list, not an object"),
    "bad-json": ({"raw_config": "{not json"}, "adapter_config.json is not readable JSON"),
}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-lora-dir")
    adapter(root, "good")
    for name, (how, _) in BAD.items():
        adapter(root, name, **how)
    truncated = adapter(root, "truncated") / "adapter_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-500])
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, lora_dir: Path) -> Iterator[LiveServer]:
    live = launch(tmp_path_factory.mktemp("bad-adapters"), "bad-adapters", "--lora-dir", str(lora_dir),
                  "--allow-runtime-lora")
    try:
        live.wait_ready()  # the bad folders did not stop start-up
        yield live
    finally:
        live.stop()


def complete(live: LiveServer, model: str) -> str:
    out = live.client().completions.create(model=model, prompt="Return the", max_tokens=4, temperature=0)
    return out.choices[0].text


def test_good_adapters_and_the_base_serve_beside_bad_folders(server: LiveServer) -> None:
    texts = {m: complete(server, m) for m in ("upper", "good", "base")}
    assert texts["good"] == texts["upper"] != texts["base"]


@pytest.mark.parametrize("name", [*BAD, "truncated"])
def test_bad_adapter_is_a_400_and_the_engine_keeps_serving(server: LiveServer, name: str) -> None:
    before = {m: complete(server, m) for m in ("upper", "base")}
    for _ in range(2):  # asked again, it is refused again (no half-loaded adapter left behind)
        with pytest.raises(openai.BadRequestError) as info:
            complete(server, name)
        message = info.value.response.json()["error"]["message"]
        assert f"adapter {name!r} could not be loaded" in message
        assert (BAD[name][1] if name in BAD else "lies past the end of the file") in message
    assert server.health()["status"] == "ok"
    assert {m: complete(server, m) for m in ("upper", "base", "good")} == {**before, "good": before["upper"]}


def test_runtime_load_of_a_bad_folder_is_a_400(server: LiveServer, lora_dir: Path) -> None:
    r = httpx.post(f"{server.base_url}/load_lora_adapter", timeout=60,
                   json={"lora_name": "rt-bad", "lora_path": str(lora_dir / "b-rank")})
    assert r.status_code == 400
    assert "lora_A has rank 8 but its lora_B has rank 4" in r.json()["error"]["message"]
    assert complete(server, "upper")
    r = httpx.post(f"{server.base_url}/load_lora_adapter", timeout=60,
                   json={"lora_name": "rt-good", "lora_path": str(lora_dir / "good")})
    assert r.status_code == 200
    assert complete(server, "rt-good") == complete(server, "upper")


@pytest.mark.parametrize("flag", ["/tmp", "b-rank", "list-config"])
def test_bad_lora_flag_is_one_line_and_exit_code_2(flag: str, lora_dir: Path) -> None:
    path = flag if flag.startswith("/") else str(lora_dir / flag)
    cmd = [sys.executable, "-m", "sloth_serve.cli", "--port", str(free_port()), "--lora", f"bad={path}",
           "--load-format", "safetensors"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lora bad=" in lines[0], done.stderr
