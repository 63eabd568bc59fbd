"""The Kubernetes manifests parse and hang together: one GPU per pod, probes on /health that
give the model time to load, models from the PVC, and one port everywhere (container, env,
Service, scrape annotations, ServiceMonitor)."""

from __future__ import annotations

import os

import yaml

from moestream.server.cli import build_parser
from tests.deploy.dockerfile import parse_dockerfile
from tests.deploy.live import DEPLOY, REPO_ROOT

K8S = DEPLOY / "k8s"
DOCS = {d["kind"]: d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())}
DEPLOYMENT, SERVICE = DOCS["Deployment"], DOCS["Service"]
POD = DEPLOYMENT["spec"]["template"]
(CONTAINER,) = POD["spec"]["containers"]
MODEL_LOAD_S = 300  # a big model may take minutes to load before /health says ready


def container_port(port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in CONTAINER["ports"] if p.get("name") == port]
    return number


def container_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in CONTAINER["env"] if "value" in e}


def test_every_manifest_has_kind_and_name():
    assert set(DOCS) >= {"Deployment", "Service", "PersistentVolumeClaim", "ServiceMonitor", "Kustomization"}
    for kind, doc in DOCS.items():
        assert doc["apiVersion"] and (kind == "Kustomization" or doc["metadata"]["name"]), kind
    for resource in DOCS["Kustomization"]["resources"]:
        assert (K8S / resource).is_file(), resource


def test_one_gpu_per_pod_and_replicas_behind_the_service():
    assert int(CONTAINER["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert DEPLOYMENT["spec"]["replicas"] >= 1
    labels = POD["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert SERVICE["spec"]["selector"].items() <= labels.items()


def test_probes_on_health_leave_time_to_load_the_model():
    port = container_port(CONTAINER["ports"][0]["containerPort"])
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = CONTAINER[kind]["httpGet"]
        assert probe["path"] == "/health" and container_port(probe["port"]) == port, kind
    startup = CONTAINER["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MODEL_LOAD_S


def test_one_port_everywhere(monkeypatch):
    port = CONTAINER["ports"][0]["containerPort"]
    assert int(container_env()["MOESTREAM_PORT"]) == port
    (service_port,) = SERVICE["spec"]["ports"]
    assert container_port(service_port["targetPort"]) == port
    annotations = POD["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    (endpoint,) = DOCS["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"
    assert DOCS["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= SERVICE["metadata"]["labels"].items()
    args = parse_container_args(monkeypatch)
    assert (args.host, args.port) == ("0.0.0.0", port)


def parse_container_args(monkeypatch):
    """What `moestream` makes of the container's args and env."""
    for key in [k for k in os.environ if k.startswith("MOESTREAM_")]:
        monkeypatch.delenv(key)
    for key, value in container_env().items():
        monkeypatch.setenv(key, value)
    return build_parser().parse_args(CONTAINER["args"])


def test_models_come_from_the_pvc_read_only(monkeypatch):
    (mount,) = [m for m in CONTAINER["volumeMounts"] if m["mountPath"] == "/models"]
    (volume,) = [v for v in POD["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == DOCS["PersistentVolumeClaim"]["metadata"]["name"]
    assert mount["readOnly"]
    assert parse_container_args(monkeypatch).model.startswith("/models/")


def test_runs_as_the_image_user_and_outlasts_the_drain(monkeypatch):
    security = POD["spec"]["securityContext"]
    image_user = parse_dockerfile(REPO_ROOT / "Dockerfile")[-1].last("USER").args.split(":")[0]
    assert security["runAsNonRoot"] and str(security["runAsUser"]) == image_user
    assert POD["spec"]["terminationGracePeriodSeconds"] > parse_container_args(monkeypatch).shutdown_grace
