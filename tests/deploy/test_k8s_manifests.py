"""deploy/k8s checked offline: core resources against the Kubernetes OpenAPI schemas that
kubernetes-validate bundles (strict: unknown fields fail), the CRDs (ServiceMonitor, ScaledObject)
and the Kustomization against the reduced schemas in schemas/, the wiring between them, and (where
kubectl is installed) the kustomize build."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import K8S, ROOT, find_tool, parse_dockerfile

SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRD_SCHEMAS = {"ServiceMonitor": "servicemonitor.json", "ScaledObject": "scaledobject.json",
               "PrometheusRule": "prometheusrule.json", "Kustomization": "kustomization.json"}
# The oldest Kubernetes these manifests are meant for (PDB unhealthyPodEvictionPolicy is GA in
# 1.31) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.31", "1.37"]


def validate_core(resource: dict[str, Any], version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    kv.validate(resource, version, strict=True)


def crd_errors(resource: dict[str, Any]) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install check-jsonschema (brings jsonschema)")
    from referencing import Registry, Resource

    def load(name: str) -> dict[str, Any]:
        return json.loads((SCHEMAS / name).read_text())

    registry = Registry().with_resource("common.json", Resource.from_contents(load("common.json")))
    validator = jsonschema.Draft202012Validator(load(CRD_SCHEMAS[resource["kind"]]), registry=registry)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]


def pod_spec(k8s: dict[str, Any]) -> dict[str, Any]:
    return k8s["Deployment"]["spec"]["template"]["spec"]


def server_container(k8s: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(k8s)["containers"]
    return container


def test_kustomization_lists_every_manifest_once() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_resources_match_the_kubernetes_schemas(k8s_docs: list[tuple[Path, Any]], version: str) -> None:
    checked = 0
    for path, resource in k8s_docs:
        if resource["kind"] not in CRD_SCHEMAS:
            try:
                validate_core(resource, version)
            except Exception as exc:
                raise AssertionError(f"{path.relative_to(ROOT)} ({resource['kind']}): {exc}") from exc
            checked += 1
    assert checked >= 6


def test_custom_resources_match_their_schemas(k8s_docs: list[tuple[Path, Any]]) -> None:
    kustomization = K8S / "kustomization.yaml"
    kinds = set()
    for path, resource in [*k8s_docs, (kustomization, yaml.safe_load(kustomization.read_text()))]:
        if resource["kind"] in CRD_SCHEMAS:
            assert crd_errors(resource) == [], path.relative_to(ROOT)
            kinds.add(resource["kind"])
    assert kinds == set(CRD_SCHEMAS)


def test_validators_reject_misspelt_or_mistyped_fields(k8s: dict[str, Any]) -> None:
    deployment = json.loads(json.dumps(k8s["Deployment"]))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbes"] = container.pop("livenessProbe")
    with pytest.raises(Exception, match="livenessProbes"):
        validate_core(deployment, KUBERNETES_VERSIONS[-1])
    scaled = json.loads(json.dumps(k8s["ScaledObject"]))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # KEDA wants strings
    assert crd_errors(scaled)
    monitor = json.loads(json.dumps(k8s["ServiceMonitor"]))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert crd_errors(monitor)


def test_deployment_asks_for_one_gpu(k8s: dict[str, Any]) -> None:
    resources = server_container(k8s)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"].get("nvidia.com/gpu", 1)) == 1


def test_probes_use_health_with_room_for_model_loading(k8s: dict[str, Any]) -> None:
    container = server_container(k8s)
    port_names = {p["name"] for p in container["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert probe["httpGet"]["path"] == "/health" and probe["httpGet"]["port"] in port_names, kind
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading needs minutes"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, "liveness must tolerate a busy pod"
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 15, "leave the Service promptly"


def test_termination_grace_covers_prestop_and_drain(k8s: dict[str, Any], parse_cli: Any) -> None:
    container = server_container(k8s)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    args = container["args"]
    shutdown_timeout = int(args[args.index("--shutdown-timeout") + 1])
    assert pod_spec(k8s)["terminationGracePeriodSeconds"] > pre_stop + shutdown_timeout
    assert 5 <= pre_stop < 30


def test_container_args_are_valid_sloth_serve_flags(k8s: dict[str, Any], parse_cli: Any) -> None:
    args = parse_cli(server_container(k8s)["args"])
    assert args.model == "/model"
    # Adapters come from the adapters volume: the whole folder (--lora-dir) or folders inside it.
    assert args.lora_dirs == ("/adapters",) or (
        args.lora_modules and all(p.startswith("/adapters/") for _, p in args.lora_modules))
    if args.pending:
        pytest.skip(f"sloth-serve does not have {', '.join(args.pending)} yet (issue 8)")


def test_model_and_adapters_come_from_shared_volumes(k8s: dict[str, Any], k8s_docs: list[Any]) -> None:
    claims = {doc["metadata"]["name"]: doc for _, doc in k8s_docs if doc["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in pod_spec(k8s)["volumes"]}
    mounts = {m["mountPath"]: m for m in server_container(k8s)["volumeMounts"]}
    for path in ("/model", "/adapters"):
        mount = mounts[path]
        assert mount.get("readOnly") is True
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"] or "ReadOnlyMany" in claims[claim][
            "spec"]["accessModes"], f"{claim}: every replica mounts it"


def test_pod_runs_as_the_image_user_on_a_read_only_root(k8s: dict[str, Any]) -> None:
    dockerfile = parse_dockerfile((ROOT / "Dockerfile").read_text())
    uid = int(dockerfile.final.all("USER")[0].args.split(":")[0])
    security = pod_spec(k8s)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
    container = server_container(k8s)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    workdir = dockerfile.final.all("WORKDIR")[-1].args
    assert {"/cache", "/tmp", workdir} <= writable


def test_compiled_kernels_persist_on_a_volume_every_replica_shares(k8s: dict[str, Any], k8s_docs: list[Any]) -> None:
    # Triton's cache (the image's TRITON_CACHE_DIR) on a claim: a restarted or added pod reads the
    # kernels the first one compiled instead of compiling them again (issue 23).
    env = " ".join(e.args for e in parse_dockerfile((ROOT / "Dockerfile").read_text()).final.all("ENV"))
    triton_dir = env.split("TRITON_CACHE_DIR=", 1)[1].split()[0]
    mounts = {m["mountPath"]: m for m in server_container(k8s)["volumeMounts"]}
    mount = mounts[triton_dir]
    assert not mount.get("readOnly")
    volume = next(v for v in pod_spec(k8s)["volumes"] if v["name"] == mount["name"])
    claims = {doc["metadata"]["name"]: doc for _, doc in k8s_docs if doc["kind"] == "PersistentVolumeClaim"}
    claim = claims[volume["persistentVolumeClaim"]["claimName"]]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "every replica writes and reads it"
    assert "pvc.yaml" in (K8S / "kustomization.yaml").read_text()


def test_service_monitor_and_pdb_select_the_server_pods(k8s: dict[str, Any]) -> None:
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = k8s["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert k8s["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in server_container(k8s)["ports"]}
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in container_ports
    monitor = k8s["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} == {port["name"]}
    assert all(e["path"] == "/metrics" for e in monitor["endpoints"])
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_autoscalers_target_the_deployment(k8s: dict[str, Any]) -> None:
    name = k8s["Deployment"]["metadata"]["name"]
    scaled = k8s["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    hpa = yaml.safe_load((K8S / "optional" / "hpa-prometheus-adapter.yaml").read_text())
    assert hpa["spec"]["scaleTargetRef"]["name"] == name


def test_keda_queries_select_this_deployment_series(k8s: dict[str, Any]) -> None:
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    service = k8s["Service"]["metadata"]["name"]
    queries = [t["metadata"]["query"] for t in k8s["ScaledObject"]["spec"]["triggers"]]
    assert any("vllm:num_requests_waiting" in q for q in queries)
    for query in queries:
        # Series carry the namespace and service labels the Prometheus Operator adds.
        assert f'namespace="{namespace}"' in query and f'service="{service}"' in query, query


def test_kustomize_build_renders_valid_namespaced_resources() -> None:
    # `kubectl kustomize` is kustomize built into kubectl; it runs offline.
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    kinds = set()
    for resource in rendered:
        kinds.add(resource["kind"])
        if resource["kind"] == "Namespace":
            assert resource["metadata"]["name"] == namespace
        else:
            assert resource["metadata"]["namespace"] == namespace, resource["kind"]
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sloth-serve"
        if resource["kind"] in CRD_SCHEMAS:
            assert crd_errors(resource) == [], resource["kind"]
        else:
            validate_core(resource, KUBERNETES_VERSIONS[-1])
    assert {"Deployment", "Service", "ServiceMonitor", "ScaledObject", "PodDisruptionBudget"} <= kinds
    (deployment,) = [r for r in rendered if r["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("sloth-serve:") and not image.endswith(":latest")


def test_pods_get_no_service_account_token(k8s: dict[str, Any]) -> None:
    assert pod_spec(k8s)["automountServiceAccountToken"] is False


def test_network_policy_lets_in_only_the_http_port_and_out_only_dns(k8s: dict[str, Any]) -> None:
    policy = k8s["NetworkPolicy"]["spec"]
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}  # both listed: both default to deny
    container_ports = {p["name"] for p in server_container(k8s)["ports"]}
    ingress_ports = [p for rule in policy["ingress"] for p in rule["ports"]]
    assert ingress_ports and all(p["port"] in container_ports and p["protocol"] == "TCP" for p in ingress_ports)
    assert all("ports" in rule for rule in policy["ingress"]), "an ingress rule without ports opens every port"
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP")}


def test_prometheus_rule_carries_the_alerts_file(k8s: dict[str, Any]) -> None:
    alerts = yaml.safe_load((K8S.parent / "prometheus" / "alerts.yml").read_text())
    rule = k8s["PrometheusRule"]
    assert rule["spec"]["groups"] == alerts["groups"], "deploy/k8s/prometheusrule.yaml differs from alerts.yml"
    assert rule["metadata"]["labels"]["release"] == k8s["ServiceMonitor"]["metadata"]["labels"]["release"]
