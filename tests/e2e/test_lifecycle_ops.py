"""Operations on a live server: SIGTERM drains in-flight streams and exits 0; adapters are loaded
and unloaded at runtime without losing streams; --lora-dir serves folders by name, reloads a
changed checkpoint, and refuses names that leave the directory."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import BASE_MODEL, LiveServer, launch

from sloth_serve.loader import DEMO_ADAPTER


def stream_text(server: LiveServer, model: str, max_tokens: int, out: list, prompt: str = "Return the") -> None:
    try:
        stream = server.client().completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        out.append(("ok", "".join(c.choices[0].text for c in chunks if c.choices),
                    next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)))
    except Exception as exc:  # recorded, so the test can show it
        out.append(("error", repr(exc), None))


def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path: Path) -> None:
    server = launch(tmp_path, "drain", "--shutdown-timeout", "60")
    try:
        server.wait_ready()
        results: list = []
        threads = [threading.Thread(target=stream_text, args=(server, BASE_MODEL, 120, results)) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while server.health().get("num_running", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(f"{server.base_url}/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        for t in threads:
            t.join(timeout=120)
        assert [r[0] for r in results] == ["ok"] * 3, results
        assert all(r[2] == "length" for r in results)
        assert server.process.wait(timeout=60) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-dir")
    shutil.copytree(DEMO_ADAPTER, root / "shouty")
    return root


@pytest.fixture(scope="module")
def ops_server(tmp_path_factory: pytest.TempPathFactory, lora_dir: Path):  # type: ignore[no-untyped-def]
    server = launch(tmp_path_factory.mktemp("ops"), "ops", "--lora-dir", str(lora_dir), "--allow-runtime-lora")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def chat(server: LiveServer, model: str) -> str:
    r = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What does `json.dumps` do?"}], max_tokens=12, temperature=0
    )
    return r.choices[0].message.content or ""


def test_lora_dir_adapter_is_served_by_folder_name_on_first_use(ops_server: LiveServer) -> None:
    text = chat(ops_server, "shouty")
    letters = [c for c in text if c.isalpha()]
    assert letters and all(c.isupper() for c in letters)
    ids = [m.id for m in ops_server.client().models.list().data]
    assert "shouty" in ids


@pytest.mark.parametrize("name", ["../shouty", "/etc", "..", "shouty/../shouty", "escape"])
def test_names_leaving_the_lora_dir_are_not_found(ops_server: LiveServer, lora_dir: Path, name: str) -> None:
    outside = lora_dir.parent / "outside-adapter"
    if not outside.exists():
        shutil.copytree(DEMO_ADAPTER, outside)
        (lora_dir / "escape").symlink_to(outside)  # a symlink out of the directory
    r = httpx.post(f"{ops_server.base_url}/chat/completions", timeout=30,
                   json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["message"]


def test_changed_checkpoint_is_reloaded_for_new_requests(ops_server: LiveServer, lora_dir: Path) -> None:
    folder = lora_dir / "swap"
    shutil.copytree(DEMO_ADAPTER, folder)
    shouting = chat(ops_server, "swap")
    assert shouting == chat(ops_server, "shouty")
    # A trainer overwrites the folder with a different checkpoint: B scaled to zero = the base model.
    from safetensors.torch import load_file, save_file

    tensors = {k: v * 0 if "lora_B" in k else v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    time.sleep(0.05)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    assert chat(ops_server, "swap") == chat(ops_server, BASE_MODEL)


def test_runtime_load_and_unload_lose_no_stream(ops_server: LiveServer, lora_dir: Path) -> None:
    results: list = []
    threads = [threading.Thread(target=stream_text, args=(ops_server, m, 60, results)) for m in ("upper", BASE_MODEL)]
    for t in threads:
        t.start()
    shutil.copytree(DEMO_ADAPTER, lora_dir / "runtime-one")
    url = ops_server.base_url
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "rt", "lora_path": str(lora_dir / "runtime-one")},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert chat(ops_server, "rt") == chat(ops_server, "upper")
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "upper"}, timeout=60)
    assert r.status_code == 200, r.text
    for t in threads:
        t.join(timeout=120)
    assert [r[0] for r in results] == ["ok", "ok"], results  # the stream on "upper" finished on its weights
    missing = httpx.post(f"{url}/chat/completions", timeout=30,
                         json={"model": "upper", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert missing.status_code == 404


def test_runtime_load_refuses_paths_outside_the_lora_dirs(ops_server: LiveServer) -> None:
    r = httpx.post(f"{ops_server.base_url}/load_lora_adapter", timeout=30,
                   json={"lora_name": "evil", "lora_path": str(DEMO_ADAPTER)})
    assert r.status_code == 400 and "outside the allowed directories" in r.json()["error"]["message"]


def test_adapter_calls_name_a_missing_folder_and_refuse_the_base(ops_server: LiveServer, lora_dir: Path) -> None:
    url = ops_server.base_url
    r = httpx.post(f"{url}/load_lora_adapter", timeout=30,
                   json={"lora_name": "ghost", "lora_path": str(lora_dir / "no-such-folder")})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": BASE_MODEL}, timeout=30)
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"], r.text
