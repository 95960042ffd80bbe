"""A sloth-serve subprocess on 127.0.0.1 for the end-to-end tests, and its clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from openai import OpenAI

from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-secret"
BASE_MODEL = DEMO_MODEL.name  # the id the server gives the base model: its folder's name
STARTUP_TIMEOUT_S = 300  # generous: a busy 2-core CI machine started three servers in over 120 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kwargs: object) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=self.api_key or "unused", max_retries=0, **kwargs)  # type: ignore[arg-type]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def launch(tmp_dir: Path, name: str, *flags: str, api_key: str | None = None, demo_adapter: bool = True) -> LiveServer:
    """`demo_adapter`: serve the demo's upper-case adapter as "upper" (it fits the demo model only)."""
    port = free_port()
    log_path = tmp_dir / f"{name}.log"
    cmd = [
        sys.executable, "-m", "sloth_serve.cli",
        "--host", "127.0.0.1", "--port", str(port),
        *(["--lora", f"upper={DEMO_ADAPTER}"] if demo_adapter else []),
        "--num-kv-blocks", "512",
        "--log-level", "warning",
        *flags,
    ]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return LiveServer(f"http://127.0.0.1:{port}", process, log_path, api_key)
