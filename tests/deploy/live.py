"""Live processes for the deploy tests: a `moestream serve --demo` and a real Prometheus
whose config is derived from deploy/prometheus.yml, both on free loopback ports."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
SCRAPE_INTERVAL_S = 1
SERVED_MODEL_NAME = "deploy-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    """A child process logging to a file; `stop` ends only this process."""

    proc: subprocess.Popen
    log_path: Path
    name: str

    @classmethod
    def launch(cls, name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> Process:
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return cls(proc, log_path, name)

    def wait_until(self, is_ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if is_ready():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: not ready after {timeout_s} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text()[-6000:]


@dataclass
class LiveServer:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(tmp: Path, args: list[str]) -> LiveServer:
    port = free_port()
    cmd = [sys.executable, "-m", "moestream.server.cli", "serve", "--port", str(port), *args]
    # The flags are the whole config: no MOESTREAM_* variable of the caller leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESTREAM_")}
    process = Process.launch("moestream serve", cmd, tmp / "server.log", env)
    server = LiveServer(process, port)
    process.wait_until(lambda: httpx.get(f"{server.url}/health", timeout=2).status_code == 200, timeout_s=120)
    return server


def derived_prometheus_config(target: str) -> dict:
    """deploy/prometheus.yml with its moestream job pointed at `target`, scraping fast."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "moestream"]
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
    job["scrape_timeout"] = f"{SCRAPE_INTERVAL_S}s"
    return config


@dataclass
class LivePrometheus:
    process: Process
    port: int

    def query(self, promql: str) -> dict:
        """/api/v1/query's `data`; asserts the query was valid."""
        response = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{promql}\n-> {body}"
        return body["data"]

    def label_values(self, label: str, match: str) -> list[str]:
        response = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/label/{label}/values",
                             params={"match[]": match}, timeout=10)
        return response.json()["data"]

    def value(self, promql: str) -> float:
        """The first sample's value, NaN when the result is empty."""
        result = self.query(promql)["result"]
        return float(result[0]["value"][1]) if result else math.nan

    def wait_for(self, promql: str, predicate: Callable[[float], bool], timeout_s: float) -> None:
        self.process.wait_until(lambda: predicate(self.value(promql)), timeout_s)


def start_prometheus(binary: str, tmp: Path, target: str) -> LivePrometheus:
    port = free_port()
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(derived_prometheus_config(target)))
    cmd = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    process = Process.launch("prometheus", cmd, tmp / "prometheus.log", dict(os.environ))
    process.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200,
                       timeout_s=30)
    return LivePrometheus(process, port)
