"""The Grafana dashboard against a live server scraped by a real Prometheus: every PromQL
expression is valid and returns data, and every metric the deploy files name is exported."""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.dashboard import (METRIC_NAME, load_dashboard, panel_queries, substitute,
                                    variable_queries)
from tests.deploy.live import (DEPLOY, SCRAPE_INTERVAL_S, SERVED_MODEL_NAME, LivePrometheus, LiveServer,
                               start_prometheus)

NUM_REQUESTS = 3
MAX_TOKENS = 4
# What Grafana would put in: windows long enough to hold the scrape before the requests.
GRAFANA_VALUES = {"__rate_interval": "2m", "__interval": "15s", "__range": "2m",
                  "model_name": SERVED_MODEL_NAME}
QUERIES = panel_queries(load_dashboard())


def _chat(server: LiveServer, i: int) -> int:
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": SERVED_MODEL_NAME, "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": f"Count to {i + 3}."}]})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["completion_tokens"]


@pytest.fixture(scope="module")
def warm_up_tokens(live_server: LiveServer) -> int:
    """One request before Prometheus starts: labelled series (per layer, per finish reason)
    exist from the first scrape on, so the traffic after it shows as increases."""
    return _chat(live_server, 0)


@pytest.fixture(scope="module")
def prometheus(live_server: LiveServer, warm_up_tokens: int, tmp_path_factory) -> Iterator[LivePrometheus | None]:
    """Prometheus scraping the live server, after its first successful scrape; None when
    the `prometheus` binary is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        yield None
        return
    prom = start_prometheus(binary, tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{live_server.port}")
    prom.wait_for('up{job="moestream"}', lambda up: up == 1, timeout_s=30)
    yield prom
    prom.process.stop()


@pytest.fixture(scope="module")
def completion_tokens(live_server: LiveServer, prometheus: LivePrometheus | None, warm_up_tokens: int) -> int:
    """Chat requests sent after Prometheus' first scrape and seen by a later one; the
    completion tokens the API reported for all requests so far."""
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        total = sum(pool.map(lambda i: _chat(live_server, i), range(1, NUM_REQUESTS + 1)))
    done_s = time.time()
    if prometheus is not None:  # a scrape that began after the last request finished
        prometheus.wait_for('timestamp(up{job="moestream"})', lambda scraped_s: scraped_s > done_s,
                            timeout_s=10 + 5 * SCRAPE_INTERVAL_S)
    return warm_up_tokens + total


@pytest.fixture
def scraped(prometheus: LivePrometheus | None, completion_tokens: int) -> LivePrometheus:
    if prometheus is None:
        pytest.skip("the `prometheus` binary is not installed (Debian: apt-get install prometheus); "
                    "the dashboard's PromQL was not run")
    return prometheus


def exported_sample_names(server: LiveServer) -> set[str]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_dashboard_has_queries():
    assert len(QUERIES) >= 20
    assert len({q.id for q in QUERIES}) == len(QUERIES), "panel titles and refIds must name each query once"


def test_prometheus_stores_the_names_the_server_exports(scraped: LivePrometheus, live_server: LiveServer):
    stored = set(scraped.label_values("__name__", '{job="moestream"}'))
    exported = {name for name in exported_sample_names(live_server) if name.startswith("moestream:")}
    assert exported <= stored, (
        f"exported but not stored: {sorted(exported - stored)[:5]}...; stored instead: "
        f"{sorted(stored - exported)[:5]}... (prometheus_client's OpenMetrics output, which Prometheus "
        "2.x asks for first, turns ':' into '_' in sample names, prometheus/client_python#1177: "
        "/metrics must answer in the text format)")


@pytest.mark.parametrize("query", QUERIES, ids=[q.id for q in QUERIES])
def test_panel_query_returns_data(scraped: LivePrometheus, query):
    result = scraped.query(substitute(query.expr, GRAFANA_VALUES))
    assert result["resultType"] == "vector"
    values = [float(sample["value"][1]) for sample in result["result"]]
    assert values, f"{query.id}: no data for {query.expr}"
    assert any(math.isfinite(v) for v in values), f"{query.id}: only NaN/Inf ({values}) for {query.expr}"


def test_model_variable_lists_the_served_model(scraped: LivePrometheus):
    for definition in variable_queries(load_dashboard()):
        (metric, label), = re.findall(r"label_values\(([\w:]+),\s*(\w+)\)", definition)
        assert SERVED_MODEL_NAME in scraped.label_values(label, metric), definition


def test_prometheus_counts_the_tokens_the_api_reported(scraped: LivePrometheus, completion_tokens: int):
    assert scraped.value("sum(moestream:generation_tokens_total)") == completion_tokens


def test_deploy_files_name_only_exported_metrics(live_server: LiveServer, completion_tokens: int):
    """Dashboard, compose, Prometheus and Kubernetes files: every `moestream:` metric they
    name is one the live server exports (after traffic, so labelled series exist)."""
    exported = exported_sample_names(live_server)
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".json", ".yml", ".yaml")]
    named = {(name, p.relative_to(DEPLOY).as_posix()) for p in files for name in METRIC_NAME.findall(p.read_text())}
    assert {name for name, _ in named} >= {"moestream:generation_tokens_total", "moestream:vram_used_bytes"}
    missing = sorted((file, name) for name, file in named if name not in exported)
    assert not missing, f"not exported by the server: {missing}"
