"""The Kubernetes manifests (deploy/k8s): schema-valid, consistent with the image and the app, and
free of credentials."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from fastapi import FastAPI

from digitflow_fastapi.app import create_app
from digitflow_fastapi.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[3]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
VALIDATOR = Path(sys.executable).parent / "kubernetes-validate"
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY", re.I)


def resource_files() -> list[Path]:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    return [K8S_DIR / name for name in kustomization["resources"]]


def documents() -> list[dict[str, Any]]:
    return [doc for path in resource_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str) -> dict[str, Any]:
    found = [doc for doc in documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def api_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def test_the_kustomization_lists_every_manifest_in_the_folder() -> None:
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {KUSTOMIZATION.name}
    assert {p.name for p in resource_files()} == on_disk


@pytest.mark.parametrize("manifest", [p.name for p in resource_files()])
def test_each_manifest_passes_kubernetes_validate_strict(manifest: str) -> None:
    validator = str(VALIDATOR) if VALIDATOR.exists() else shutil.which("kubernetes-validate")
    assert validator, "kubernetes-validate is in the dev extra"
    result = subprocess.run(
        [validator, "--strict", "--no-warn", str(K8S_DIR / manifest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def status_of(app: FastAPI, path: str) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        return (await client.get(path)).status_code


def test_the_probes_point_at_routes_the_app_really_serves() -> None:
    container = api_container()
    probes = {
        name: container[name]["httpGet"]
        for name in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["startupProbe"]["path"] == "/ready"
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    app = create_app(Settings())
    served = {path for path, methods in app.openapi()["paths"].items() if "get" in methods}
    assert {probe["path"] for probe in probes.values()} <= served, served
    # No lifespan runs here: the model is not loaded, as when a pod starts.
    assert asyncio.run(status_of(app, "/health")) == 200
    assert asyncio.run(status_of(app, "/ready")) == 503
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in probes.values():
        assert port_names[probe["port"]] == int(env_of(container)["PORT"])


def literal_credentials(node: Any, where: str = "") -> list[str]:
    """Places where a credential-like variable is given a literal value."""
    found: list[str] = []
    if isinstance(node, dict):
        if "name" in node and "value" in node and CREDENTIAL_NAME.search(str(node["name"])):
            found.append(f"{where}: {node['name']}")
        for key, value in node.items():
            found += literal_credentials(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += literal_credentials(value, f"{where}[{index}]")
    return found


def test_no_secret_value_appears_in_the_manifests() -> None:
    docs = documents()
    assert not [doc for doc in docs if doc["kind"] == "Secret"]
    for doc in docs:
        assert literal_credentials(doc) == [], doc["metadata"]["name"]
        if doc["kind"] == "ConfigMap":
            assert not [key for key in doc["data"] if CREDENTIAL_NAME.search(key)]
    init = pod_spec()["initContainers"][0]
    secret_refs = [ref["secretRef"]["name"] for ref in init["envFrom"] if "secretRef" in ref]
    assert secret_refs == ["digitflow-store-credentials"]
    assert "envFrom" not in api_container(), "the serving container needs no credentials"


def test_the_init_container_pulls_into_the_folder_the_server_reads() -> None:
    init = pod_spec()["initContainers"][0]
    api = api_container()
    assert init["command"] == ["digitflow", "pull"]
    dest = init["args"][init["args"].index("--dest") + 1]
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    api_mounts = {m["mountPath"]: m for m in api["volumeMounts"]}
    assert env_of(api)["PRED_MODELS_DIR"] == dest
    assert api_mounts[dest]["name"] == init_mounts[dest]
    assert api_mounts[dest].get("readOnly") is True
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert "emptyDir" in volumes[init_mounts[dest]]
    uri_sources = [
        item["valueFrom"]["configMapKeyRef"]
        for item in api["env"]
        if item["name"] == "PRED_MODEL_URI"
    ]
    assert uri_sources == [{"name": "digitflow-model", "key": "PRED_MODEL_URI"}]


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_cpu_requests_and_limits_match_workers_times_threads() -> None:
    api = api_container()
    env = env_of(api)
    cores = int(env["WEB_CONCURRENCY"]) * int(env["TORCH_THREADS"])
    assert cpu_cores(api["resources"]["requests"]["cpu"]) == cores
    assert cpu_cores(api["resources"]["limits"]["cpu"]) == cores


def image_uid() -> int:
    users = re.findall(r"^USER (\d+)", (REPO_ROOT / "Dockerfile").read_text(), re.M)
    return int(users[-1].split(":")[0])


def test_pods_run_non_root_read_only_without_privileges_as_the_image_user() -> None:
    pod = pod_spec()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid()
    assert pod["automountServiceAccountToken"] is False
    for container in [*pod["initContainers"], *pod["containers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_a_prestop_pause_fits_inside_the_grace_period() -> None:
    pause = api_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert int(pause[1]) + 10 <= grace  # the pause, then gunicorn's drain well inside the rest


def test_service_pdb_and_hpa_target_the_deployments_pods() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one("Service")["spec"]["selector"].items() <= labels.items()
    assert one("Service")["spec"]["ports"][0]["targetPort"] == "http"
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def _url_port(url: str) -> int:
    parsed = urlsplit(url)
    return parsed.port or {"http": 80, "https": 443}[parsed.scheme]


def test_the_network_policy_admits_only_the_serving_port_and_the_pull_s_traffic() -> None:
    policy = one("NetworkPolicy")["spec"]
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    # Ingress: one rule, the serving port only (named as the container names it).
    [ingress] = policy["ingress"]
    container_ports = {p["name"]: p["containerPort"] for p in api_container()["ports"]}
    assert [(p["port"], p["protocol"]) for p in ingress["ports"]] == [("http", "TCP")]
    assert container_ports["http"] == int(env_of(api_container())["PORT"])
    # Egress: DNS to kube-dns only, and the ports of the tracking server and storage.
    dns = [rule for rule in policy["egress"] if {p["port"] for p in rule["ports"]} == {53}]
    assert len(dns) == 1 and dns[0]["to"][0]["podSelector"]["matchLabels"]["k8s-app"] == "kube-dns"
    other_ports = {p["port"] for rule in policy["egress"] if rule not in dns for p in rule["ports"]}
    config = one("ConfigMap")["data"]
    needed = {_url_port(config["MLFLOW_TRACKING_URI"])}
    if config.get("MLFLOW_S3_ENDPOINT_URL"):
        needed.add(_url_port(config["MLFLOW_S3_ENDPOINT_URL"]))
    assert needed <= other_ports
    assert all(rule.get("ports") for rule in policy["egress"]), "no rule may open every port"


MIB = 1024 * 1024
# A serving worker's own memory (model, runtimes, Python), as measured under load (issue 17:
# 198-250 MiB); the budget below comes on top of it.
WORKER_BASELINE_BYTES = 250 * MIB
UNITS = {"Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB, "K": 1000, "M": 1000**2, "G": 1000**3}


def quantity_bytes(quantity: str) -> int:
    for suffix, factor in UNITS.items():
        if quantity.endswith(suffix):
            return int(float(quantity.removesuffix(suffix)) * factor)
    return int(quantity)


def effective_setting(env: dict[str, str], name: str) -> int:
    """The value the server runs with: the manifest's env, else the real Settings default."""
    default = Settings.model_fields[name].default
    return int(env.get(name, default))


def test_every_worker_s_body_budget_and_baseline_fit_the_pod_memory_limit() -> None:
    from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

    api = api_container()
    env = env_of(api)
    workers = int(env["WEB_CONCURRENCY"])
    budget = effective_setting(env, "MAX_BUFFERED_BODY_BYTES_PER_WORKER")
    upload = effective_setting(env, "MAX_UPLOAD_BYTES")
    connections = effective_setting(env, "MAX_CONNECTIONS_PER_WORKER")
    limit = quantity_bytes(api["resources"]["limits"]["memory"])
    # uvicorn reads up to HIGH_WATER_LIMIT of a body per connection before the app takes it.
    per_worker = budget + WORKER_BASELINE_BYTES + connections * HIGH_WATER_LIMIT
    assert upload <= budget, "one upload of the allowed size must fit the budget"
    assert workers * per_worker <= 0.9 * limit, (
        f"{workers} x {per_worker / MIB:.0f} MiB does not fit {limit / MIB:.0f} MiB with 10 % left"
    )
    assert quantity_bytes(api["resources"]["requests"]["memory"]) >= workers * WORKER_BASELINE_BYTES


def test_the_manifests_run_the_slim_image_make_image_builds() -> None:
    dry_run = subprocess.run(
        ["make", "-n", "-C", str(REPO_ROOT), "image"], capture_output=True, text=True, check=True
    ).stdout
    built = re.findall(r"--tag (\S+)", dry_run)
    images = yaml.safe_load(KUSTOMIZATION.read_text())["images"]
    pod = one("Deployment")["spec"]["template"]["spec"]
    names = {c["image"] for c in [*pod["initContainers"], *pod["containers"]]}
    assert [f"{i['newName']}:{i['newTag']}" for i in images if i["name"] in names] == built
