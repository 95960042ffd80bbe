"""Start-up as an operator meets it, through the real `python -m sloth_serve.cli`: a bad model, adapter,
device or port is one line and exit 2 within 2 s; a signal while loading exits at once; with
--log-format json every line is JSON and health probes stay out of the access log."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import REPO, free_port

from sloth_serve.cli import build_parser, config_from_args
from sloth_serve.loader import DEMO_MODEL
from sloth_serve.logs import ProbePathFilter, configure_logging, output_lines
from sloth_serve.preflight import cuda_device_count

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}


def cli(*flags: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sloth_serve.cli", *flags], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    return done, time.monotonic() - start


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def bad_model(tmp_path: Path, case: str) -> list[str]:
    """The flags of one unservable start-up, built in tmp_path."""
    if case == "gguf-file":
        (tmp_path / "llama.Q4_K_M.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
        return ["--model", str(tmp_path / "llama.Q4_K_M.gguf")]
    if case in ("architecture", "gptq"):
        cfg = json.loads((DEMO_MODEL / "config.json").read_text())
        if case == "architecture":
            cfg["architectures"] = ["MambaForCausalLM"]
        else:
            cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        (tmp_path / "model.safetensors").write_bytes(b"")
        return ["--model", str(tmp_path)]
    if case == "attention-config-only":  # refused from config.json alone: there are no weights to read
        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DiffLlamaForCausalLM"],
                                                          "model_type": "diffllama"}))
        return ["--model", str(tmp_path)]
    if case == "adapter-config-list":
        (tmp_path / "adapter_config.json").write_text("[]")
        return ["--lora", f"bad={tmp_path}"]
    if case == "missing-folder":
        return ["--model", str(tmp_path / "missing")]
    assert case == "cuda-without-gpu"
    if cuda_device_count()[0] > 0:
        pytest.skip("a GPU is visible here")
    return ["--device", "cuda"]


EXPECTED = {
    "gguf-file": "is a GGUF file",
    "architecture": "MambaForCausalLM model, which sloth-serve cannot run",
    "gptq": "quantized with GPTQ",
    "attention-config-only": ("DiffLlamaForCausalLM model, which sloth-serve cannot run: its differential attention "
                              "calls attention twice a layer"),
    "adapter-config-list": "JSON list, not an object",
    "missing-folder": "does not exist",
    "cuda-without-gpu": "--device cuda",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_start_up_error_is_one_line_and_exit_2_within_2s(tmp_path: Path, case: str) -> None:
    done, seconds = cli(*bad_model(tmp_path, case), "--port", str(free_port()))
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("sloth-serve: error: "), done.stderr
    assert EXPECTED[case] in lines[0]
    assert done.stdout == ""
    assert seconds < 2.0, f"took {seconds:.2f}s"


def test_port_in_use_is_one_line_before_loading(held_port: int) -> None:
    done, seconds = cli("--port", str(held_port))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{held_port}" in done.stderr and seconds < 2.0


def test_json_format_error_is_one_json_record_and_debug_adds_the_traceback(tmp_path: Path) -> None:
    flags = [*bad_model(tmp_path, "gguf-file"), "--port", str(free_port())]
    done, _ = cli(*flags, "--log-format", "json")
    [line] = done.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "error" and "GGUF file" in record["message"] and "exception" not in record
    debug, _ = cli(*flags, "--log-level", "debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "StartupError" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("sloth-serve: error: ")


def test_argparse_error_is_json_when_json_is_asked_for() -> None:
    done, _ = cli("--port", "eighty", "--log-format", "json")
    assert done.returncode == 2
    assert "invalid int value" in json.loads(done.stderr)["message"]


def start(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "sloth_serve.cli", "--port", str(port), "--num-kv-blocks", "256", *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log


def wait_for(predicate: object, what: str, process: subprocess.Popen[bytes], log: Path, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited ({process.returncode}) waiting for {what}:\n{log.read_text()}")
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no {what} after {limit}s:\n{log.read_text()}")


def health_status(url: str) -> str | None:
    try:
        return str(httpx.get(f"{url}/health", timeout=2).json()["status"])
    except httpx.TransportError:
        return None


def test_sigterm_while_loading_exits_at_once(tmp_path: Path) -> None:
    process, url, log = start(tmp_path)
    try:
        wait_for(lambda: health_status(url) is not None, "HTTP server", process, log, 120)
        if health_status(url) != "loading":
            pytest.skip("the model loaded before the signal could be sent")
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=10)
        seconds = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == 128 + signal.SIGTERM, log.read_text()
    assert seconds < 5, f"took {seconds:.1f}s to exit"
    assert "stopped by SIGTERM while loading the model" in log.read_text()


def test_json_log_is_all_json_with_phases_and_no_probe_lines(tmp_path: Path) -> None:
    process, url, log = start(tmp_path, "--log-format", "json")
    try:
        wait_for(lambda: health_status(url) == "ok", "ready server", process, log, 300)
        for path in ("/health", "/health?probe=1", "/metrics", "/v1/models"):
            assert httpx.get(url + path, timeout=10).status_code == 200
        metrics = httpx.get(url + "/metrics", timeout=10).text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    time.sleep(0.5)  # the output pump writes what it read last after the server exits
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)  # every line, library output included
        assert {"time", "level", "logger", "message"} <= set(record), line
        records.append(record)
    loggers = {r["logger"] for r in records}
    # Library output (Unsloth's print() banner, warnings) arrives as records, not raw text.
    assert loggers & {"sloth_serve.stdout", "sloth_serve.stderr", "py.warnings"}, loggers
    phases = {r.get("phase") for r in records}
    assert "import torch and the server" in phases, phases
    # The engine process's phases (Unsloth's read, the adoption) as records of their own, by kind.
    assert {"load", "convert", "other"} <= {r.get("kind") for r in records}
    (summary,) = [r for r in records if "startup_seconds" in r]
    assert summary["message"].startswith("start-up: ready in "), summary
    totals = summary["startup_seconds"]
    assert totals["load"] > 0 and totals["convert"] > 0
    assert abs(sum(v for k, v in totals.items() if k != "total") - totals["total"]) < 0.01, totals
    assert f'sloth:startup_seconds{{phase="total"}} {totals["total"]}' in metrics
    access = [r["message"] for r in records if r["logger"] == "uvicorn.access"]
    assert any("GET /v1/models" in m for m in access), access
    assert not any("/health" in m or "/metrics" in m for m in access), access


def test_access_log_flags_reach_the_logging_set_up() -> None:
    args = build_parser().parse_args(["--disable-access-log", "--disable-log-requests",
                                      "--disable-access-log-for-endpoints", "/ping"])
    config = config_from_args(args)
    assert not config.access_log and not config.log_requests and config.access_log_skip_paths == ("/ping",)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", "text", access_log=config.access_log, quiet_paths=config.access_log_skip_paths,
                          log_requests=config.log_requests)
        assert logging.getLogger("uvicorn.access").disabled
        assert not logging.getLogger("sloth_serve.requests").isEnabledFor(logging.INFO)
        configure_logging("info", "text")
        assert not logging.getLogger("uvicorn.access").disabled
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.getLogger("sloth_serve.requests").setLevel(logging.NOTSET)


def test_probe_filter_matches_paths_not_prefixes() -> None:
    keep = ProbePathFilter(["/health", "/metrics"])

    def passes(path: str) -> bool:
        record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                   ("1.2.3.4:5", "GET", path, "1.1", 200), None)
        return keep.filter(record)

    assert not passes("/health") and not passes("/health?x=1") and not passes("/metrics")
    assert passes("/v1/models") and passes("/healthz")


def test_captured_output_lines_drop_colours_and_progress_redraws() -> None:
    raw = b"\x1b[32mUnsloth\x1b[0m: ready\nLoading 1/3\rLoading 2/3\rLoading 3/3\n\n  \nlast line without newline"
    assert list(output_lines(raw)) == ["Unsloth: ready", "Loading 3/3", "last line without newline"]
