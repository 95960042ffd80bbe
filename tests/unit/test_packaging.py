"""Packaging: one version set (versions.env) behind the Makefile, CI, the Dockerfile, the image's
lock and the CLI's install hint; the console script without torch; LICENSE and py.typed in the wheel."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from sloth_serve import preflight

ROOT = Path(__file__).resolve().parents[2]


def versions() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (ROOT / "versions.env").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def lock_pins() -> dict[str, str]:
    text = (ROOT / "deploy" / "docker" / "requirements.lock").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE))


def test_versions_file_holds_the_whole_set() -> None:
    assert set(versions()) == {"TORCH_CPU_VERSION", "TORCH_CUDA_VERSION", "TRANSFORMERS_VERSION", "UNSLOTH_VERSION"}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_installs_the_versions_file_set_and_ci_runs_it() -> None:
    v = versions()
    # make itself expands the recipe (-n: print, do not run; -B: as if the venv were stale).
    recipe = subprocess.run(["make", "-n", "-B", ".venv/.installed"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=True).stdout
    assert f'"torch=={v["TORCH_CPU_VERSION"]}"' in recipe
    assert f'"transformers=={v["TRANSFORMERS_VERSION"]}"' in recipe
    assert f'"unsloth=={v["UNSLOTH_VERSION"]}" "unsloth_zoo=={v["UNSLOTH_VERSION"]}"' in recipe
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)
    test_recipe = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                 check=True).stdout
    assert "-m ruff check" in test_recipe and "-m mypy" in test_recipe and "-m pytest" in test_recipe


def test_dockerfile_and_image_lock_use_the_versions_file_set() -> None:
    v = versions()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert args["TORCH_VERSION"] == v["TORCH_CUDA_VERSION"]
    assert args["UNSLOTH_VERSION"] == v["UNSLOTH_VERSION"]
    pins = lock_pins()
    assert pins["torch"] == v["TORCH_CUDA_VERSION"]
    assert pins["transformers"] == v["TRANSFORMERS_VERSION"]


def test_pyproject_admits_the_pinned_transformers_and_names_the_license() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(Requirement(r) for r in project["dependencies"] if r.startswith("transformers"))
    assert spec.specifier.contains(versions()["TRANSFORMERS_VERSION"])
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_install_hint_names_the_versions_file_torch_builds() -> None:
    v = versions()
    assert v["TORCH_CPU_VERSION"] == preflight.TORCH_CPU_VERSION
    assert v["TORCH_CUDA_VERSION"] == preflight.TORCH_CUDA_VERSION


def test_this_environment_runs_the_pinned_versions() -> None:
    """`make venv` installed the set: a venv built before a version changed fails here."""
    v = versions()
    torch_version = importlib.metadata.version("torch")
    assert torch_version.split("+")[0] in (v["TORCH_CPU_VERSION"], v["TORCH_CUDA_VERSION"])
    assert importlib.metadata.version("transformers") == v["TRANSFORMERS_VERSION"], "run `make venv`"
    assert importlib.metadata.version("unsloth") == v["UNSLOTH_VERSION"]


# Runs the console script's function where `import torch` finds nothing, as after `pip install .`
# on a machine without torch (a path finder that skips torch; every other package is found).
WITHOUT_TORCH = """
import importlib.machinery, sys

class NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from sloth_serve.cli import main
sys.exit(main(["--port", "0"]))
"""


def test_console_script_without_torch_says_how_to_install_it() -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    v = versions()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("sloth-serve: error: PyTorch is not installed"), done.stderr
    assert f"torch=={v['TORCH_CPU_VERSION']}" in lines[0] and f"torch=={v['TORCH_CUDA_VERSION']}" in lines[0]
    assert "ModuleNotFoundError" not in done.stderr


def test_wheel_ships_license_and_type_markers(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    source = tmp_path / "src"
    # Only what the wheel is built from (a copy: the build leaves its build/ and egg-info behind).
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for package in ("server", "kernels"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300, capture_output=True)
    wheel = next((tmp_path / "dist").glob("sloth_serve-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sloth_serve/py.typed" in names and "sloth_kernels/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert "sloth_serve/preflight.py" in names and "sloth_serve/loader/demo/base/config.json" in names
    assert "sloth_serve/engine/spec_decode/__init__.py" in names and "sloth_kernels/nf4.py" in names
    # The folders' own names are not installed: `kernels` is Hugging Face's package, `server` anyone's.
    assert not any(n.startswith(("server/", "kernels/")) for n in names)


def test_every_package_folder_is_installed() -> None:
    """pyproject.toml lists the packages (the folders install under other names, which setuptools'
    package discovery cannot map): a new sub-package folder that is not listed would be left out of the
    wheel and the Docker image."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    names = {"server": "sloth_serve", "kernels": "sloth_kernels"}
    assert setuptools["package-dir"] == {new: old for old, new in names.items()}
    folders = {".".join([names[init.parent.relative_to(ROOT).parts[0]], *init.parent.relative_to(ROOT).parts[1:]])
               for folder in names for init in (ROOT / folder).rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders
