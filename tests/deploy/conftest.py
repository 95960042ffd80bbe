"""Fixtures for the deployment-file tests: the Dockerfile split into stages, the Kubernetes
manifests by kind, the compose file, and the server's own CLI parser (so every flag the manifests
pass is checked against the real `sloth-serve`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, K8S, PENDING_FLAGS, ROOT, Dockerfile, load_yaml_docs, parse_dockerfile


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every resource under deploy/k8s (optional/ included) with the file it came from."""
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "prometheus-adapter-rules.yaml":  # Helm values, not a resource
            continue
        docs.extend((path, doc) for doc in load_yaml_docs(path))
    return docs


@pytest.fixture(scope="session")
def k8s(k8s_docs: list[tuple[Path, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The kustomized resources (not optional/) by kind; each kind appears once except PVCs."""
    by_kind: dict[str, dict[str, Any]] = {}
    for path, doc in k8s_docs:
        if path.parent == K8S and doc["kind"] != "PersistentVolumeClaim":
            assert doc["kind"] not in by_kind, f"two {doc['kind']} resources"
            by_kind[doc["kind"]] = doc
    return by_kind


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="session")
def parse_cli() -> Callable[[list[str]], Any]:
    """Parse flags with sloth-serve's own parser. Flags in PENDING_FLAGS that the server does
    not know yet are dropped (with their value) and reported by `.pending` on the result."""
    from sloth_serve.cli import build_parser  # light: no torch

    parser = build_parser()
    known = {opt for action in parser._actions for opt in action.option_strings}

    def parse(argv: list[str]) -> Any:
        kept: list[str] = []
        pending: list[str] = []
        skip_value = False
        for arg in argv:
            if skip_value:
                skip_value = False
                continue
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                assert flag in PENDING_FLAGS, f"sloth-serve has no flag {flag}"
                pending.append(flag)
                skip_value = "=" not in arg
                continue
            kept.append(arg)
        try:
            ns = parser.parse_args(kept)
        except SystemExit as exc:  # argparse exits on a bad value
            raise AssertionError(f"sloth-serve rejects {kept}") from exc
        ns.pending = pending
        return ns

    return parse
