"""Compile caches (server/compile_cache.py) and `--precompile-only` (server/precompile.py): where each
tool's cache goes (flag, then the tool's own variable, then a stable per-user default), what happens
when it cannot be written, and that precompiling on the CPU says there is nothing to do and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sloth_serve import compile_cache
from sloth_serve.cli import build_parser, config_from_args, main
from sloth_serve.compile_cache import CACHE_VARS

ROOT = Path(__file__).resolve().parents[2]


def test_default_is_a_stable_per_user_directory(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    dirs = compile_cache.resolve(None, env)
    assert {d.var: d.path for d in dirs} == {var: tmp_path / "xdg" / "sloth-serve" / sub
                                            for var, sub in CACHE_VARS.items()}
    assert {d.source for d in dirs} == {"default"}
    assert compile_cache.default_root({}) == Path.home() / ".cache" / "sloth-serve"


def test_a_tools_own_variable_is_kept_unless_the_flag_is_given(tmp_path: Path) -> None:
    env = {"TRITON_CACHE_DIR": str(tmp_path / "image-triton"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    by_var = {d.var: d for d in compile_cache.resolve(None, env)}
    assert by_var["TRITON_CACHE_DIR"].path == tmp_path / "image-triton"
    assert by_var["TRITON_CACHE_DIR"].source == "$TRITON_CACHE_DIR"
    assert by_var["TORCHINDUCTOR_CACHE_DIR"].source == "default"
    flagged = {d.var: d for d in compile_cache.resolve(str(tmp_path / "root"), env)}
    assert flagged["TRITON_CACHE_DIR"].path == tmp_path / "root" / "triton"
    assert {d.source for d in flagged.values()} == {"--compile-cache-dir"}


def test_prepare_creates_the_directories_and_sets_each_variable(tmp_path: Path) -> None:
    env: dict[str, str] = {"XDG_CACHE_HOME": str(tmp_path)}
    used, warnings = compile_cache.prepare(str(tmp_path / "cc"), env)
    assert warnings == [] and len(used) == len(CACHE_VARS)
    for var, sub in CACHE_VARS.items():
        assert env[var] == str(tmp_path / "cc" / sub) and (tmp_path / "cc" / sub).is_dir()
    (tmp_path / "cc" / "triton" / "HASH").mkdir()
    assert "triton " + str(tmp_path / "cc" / "triton") + " (1 entries)" in compile_cache.describe(used)


def test_an_unwritable_flag_is_an_error_and_an_unwritable_default_a_warning(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"  # nothing can be created under a file, whoever runs this
    blocked.write_text("")
    with pytest.raises(ValueError, match=r"--compile-cache-dir .*a-file: cannot write .*a writable directory"):
        compile_cache.prepare(str(blocked), {})
    env = {"XDG_CACHE_HOME": str(blocked)}
    used, warnings = compile_cache.prepare(None, env)
    assert used == [] and len(warnings) == len(CACHE_VARS)
    assert "not kept for the next start; set --compile-cache-dir" in warnings[0]
    assert "TRITON_CACHE_DIR" not in env  # Triton keeps its own default


def test_flag_and_environment_variable_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["--compile-cache-dir", "/c"])).compile_cache_dir == "/c"
    monkeypatch.setenv("SLOTH_COMPILE_CACHE_DIR", "/from-env")
    assert config_from_args(parser.parse_args([])).compile_cache_dir == "/from-env"
    with pytest.raises(ValueError, match="leave out --no-warmup"):
        config_from_args(parser.parse_args(["--precompile-only", "--no-warmup"]))


def test_precompile_on_the_cpu_has_nothing_to_compile(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for var in CACHE_VARS:
        monkeypatch.delenv(var, raising=False)  # prepare() sets them; monkeypatch restores them
    status = main(["--precompile-only", "--device", "cpu", "--port", "0",
                   "--compile-cache-dir", str(tmp_path / "cc")])
    assert status == 0
    text = capsys.readouterr().err
    assert "nothing to compile" in text and f"triton {tmp_path / 'cc' / 'triton'}" in text
    assert (tmp_path / "cc" / "triton").is_dir()


def test_precompile_with_a_bad_model_fails_its_checks_first(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "sloth_serve.cli", "--precompile-only", "--device", "cpu",
                           "--model", str(tmp_path / "missing")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}, timeout=60)
    assert done.returncode == 2 and "does not exist" in done.stderr
