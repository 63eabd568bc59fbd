"""docker-compose.yml, prometheus.yml and the Grafana provisioning agree with each other, with
the Dockerfile and with the server's CLI; the dashboard is well formed and covers the board."""

from __future__ import annotations

import os
import re

import yaml

from moestream.server.cli import build_parser
from tests.deploy.dashboard import (DATASOURCE_VARIABLE, METRIC_NAME, load_dashboard, panel_queries,
                                    panels)
from tests.deploy.dockerfile import parse_dockerfile
from tests.deploy.live import DEPLOY, REPO_ROOT

COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
IMAGE = parse_dockerfile(REPO_ROOT / "Dockerfile")[-1]
(EXPOSED_PORT,) = [int(p) for i in IMAGE.all("EXPOSE") for p in i.args.split()]
PROMETHEUS_PORT = 9090  # Prometheus' default --web.listen-address
# What the board must show (issue 6), as the series each panel reads.
REQUIRED_SERIES = {
    "moestream:generation_tokens_total", "moestream:prompt_tokens_total",
    "moestream:time_to_first_token_seconds_bucket", "moestream:inter_token_latency_seconds_bucket",
    "moestream:e2e_request_latency_seconds_bucket", "moestream:num_requests_running",
    "moestream:num_requests_waiting", "moestream:kv_cache_usage_perc", "moestream:expert_cache_hits_total",
    "moestream:expert_cache_misses_total", "moestream:expert_bytes_to_device_total",
    "moestream:expert_copy_stall_seconds_total", "moestream:vram_used_bytes", "moestream:vram_budget_bytes",
    "moestream:request_success_total",
}
_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*))?\}")


def interpolate(text: str, shell: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME-default} and ${NAME:-default}."""
    def value(m: re.Match) -> str:
        name, operator, default = m.groups()
        if operator == ":-" and not shell.get(name):
            return default
        return shell.get(name, default or "")
    return _COMPOSE_VARIABLE.sub(value, text)


def container_env(service: dict, shell: dict[str, str]) -> dict[str, str]:
    """The variables compose gives the container: NAME=value entries interpolated, bare
    NAME entries passed through only when the shell sets them."""
    env = {}
    for entry in service["environment"]:
        name, has_value, value = entry.partition("=")
        if has_value:
            env[name] = interpolate(value, shell)
        elif name in shell:
            env[name] = shell[name]
    return env


def volume_targets(service: dict) -> dict[str, str]:
    """{container path: source} of the service's short-syntax volumes (defaults filled in)."""
    return {parts[1]: parts[0] for parts in (interpolate(v, {}).split(":") for v in service["volumes"])}


def parse_moestream_command(shell: dict[str, str], monkeypatch):
    for key in [k for k in os.environ if k.startswith("MOESTREAM_")]:
        monkeypatch.delenv(key)
    image_env = {k: v for k, v in IMAGE.env().items() if k.startswith("MOESTREAM_")}
    for key, value in {**image_env, **container_env(SERVICES["moestream"], shell)}.items():
        monkeypatch.setenv(key, value)
    return build_parser().parse_args(SERVICES["moestream"]["command"])


def test_moestream_service_gets_a_gpu_the_models_and_the_port():
    service = SERVICES["moestream"]
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == \
        REPO_ROOT / "Dockerfile"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "/models" in volume_targets(service)
    assert any(str(p).split(":")[-1] == str(EXPOSED_PORT) for p in service["ports"])


def test_moestream_command_serves_the_chosen_model_on_all_interfaces(monkeypatch):
    args = parse_moestream_command({"MOESTREAM_MODEL_FILE": "olmoe.gguf"}, monkeypatch)
    assert args.func.__name__ == "cmd_serve"
    assert (args.model, args.demo, args.host, args.port) == ("/models/olmoe.gguf", False, "0.0.0.0", EXPOSED_PORT)
    assert args.api_key is None and args.vram_budget is None  # unset in the shell: server defaults
    demo = parse_moestream_command({"MOESTREAM_DEMO": "true", "MOESTREAM_API_KEY": "k"}, monkeypatch)
    assert demo.demo and demo.api_key == "k"


def test_stop_grace_outlasts_the_server_drain(monkeypatch):
    drain_s = parse_moestream_command({}, monkeypatch).shutdown_grace
    grace = SERVICES["moestream"]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > drain_s


def test_prometheus_scrapes_the_moestream_service_every_5s():
    prometheus = SERVICES["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert volume_targets(prometheus)[config_flag.split("=", 1)[1]] == "./prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "moestream"]
    assert job["scrape_interval"] == "5s" and job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = [t for c in job["static_configs"] for t in c["targets"]]
    assert target == f"moestream:{EXPOSED_PORT}" and "moestream" in SERVICES


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    grafana = SERVICES["grafana"]
    mounts = volume_targets(grafana)
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == f"http://prometheus:{PROMETHEUS_PORT}" and "prometheus" in SERVICES
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "moestream.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (DEPLOY / mounts[dashboards_dir] / "moestream.json").is_file()
    env = dict(e.split("=", 1) for e in grafana["environment"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert interpolate(env["GF_SECURITY_ADMIN_PASSWORD"], {"GRAFANA_ADMIN_PASSWORD": "s3cret"}) == "s3cret"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/moestream.json"


def test_dashboard_uses_the_datasource_variable_everywhere():
    dashboard = load_dashboard()
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == DATASOURCE_VARIABLE]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    expected = {"type": "prometheus", "uid": "${" + DATASOURCE_VARIABLE + "}"}
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        assert all(t["datasource"] == expected for t in panel["targets"]), panel["title"]


def test_dashboard_layout_has_unique_ids_and_no_overlaps():
    boxes = [(p["id"], p["gridPos"]) for p in panels(load_dashboard())]
    assert len({i for i, _ in boxes}) == len(boxes)
    cells = {}
    for panel_id, g in boxes:
        assert g["x"] + g["w"] <= 24, panel_id
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells.get((x, y))} and {panel_id} overlap"
                cells[(x, y)] = panel_id


def test_dashboard_covers_the_board():
    queries = panel_queries(load_dashboard())
    used = {name for q in queries for name in METRIC_NAME.findall(q.expr)}
    assert REQUIRED_SERIES <= used, REQUIRED_SERIES - used
    assert any("by (layer)" in q.expr and "expert_cache_hits_total" in q.expr for q in queries)
    assert any("by (finished_reason)" in q.expr for q in queries)
    assert any("histogram_quantile(0.95" in q.expr for q in queries)


# -- every variable, a CPU recipe, a GPU image for common drivers ----------------------------
# The image fixes these two: the port mapping and Prometheus' target are written for them.
IMAGE_FIXED_VARIABLES = {"MOESTREAM_HOST", "MOESTREAM_PORT"}


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` (an override removing a value) read as a marker."""


RESET = object()
_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def compose_variables(service: dict) -> set[str]:
    return {entry.partition("=")[0] for entry in service["environment"]}


def test_compose_passes_every_serve_variable_but_the_images_host_and_port():
    from moestream.server.cli import serve_environment

    variables = compose_variables(SERVICES["moestream"])
    assert variables == set(serve_environment()) - IMAGE_FIXED_VARIABLES
    assert IMAGE_FIXED_VARIABLES <= set(IMAGE.env())
    shell = {name: "x" for name in variables}
    assert set(container_env(SERVICES["moestream"], shell)) == variables  # bare names pass through


def test_deploy_docs_list_every_serve_variable():
    from moestream.server.cli import serve_environment

    doc = (REPO_ROOT / "docs" / "DEPLOY.md").read_text()
    table = re.findall(r"^\| `(MOESTREAM_\w+)` \| `(--[\w-]+)` \|", doc, re.M)
    assert dict(table) == serve_environment()


def test_cpu_override_drops_the_gpu_and_builds_with_the_cpu_wheel():
    override = yaml.load((DEPLOY / "docker-compose.cpu.yml").read_text(), Loader=_ComposeLoader)
    (service,) = override["services"].values()
    assert set(override["services"]) == {"moestream"}
    assert service["deploy"] is RESET
    assert service["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert service["image"] != SERVICES["moestream"]["image"], "a CPU build must not overwrite the GPU image's tag"


def test_gpu_image_takes_a_cuda_12_torch_and_the_docs_state_its_driver():
    build_args = {a.args.split("=", 1)[0]: a.args.split("=", 1)[1] for a in
                  parse_dockerfile(REPO_ROOT / "Dockerfile")[0].all("ARG") if "=" in a.args}
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", build_args["TORCH_INDEX_URL"])
    cuda = build_args["TORCH_INDEX_URL"].rsplit("cu", 1)[1]
    deploy_doc = " ".join((REPO_ROOT / "docs" / "DEPLOY.md").read_text().split())
    assert f"cu{cuda}` (default) | CUDA 12.{cuda[2:]} | NVIDIA driver **" in deploy_doc
