"""A real `moestream serve` process on a free loopback port (llama.cpp's ServerProcess idea):
start it, poll /health, fail fast with its log if it dies, stop it afterwards."""

from __future__ import annotations

import os
import signal as signals
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.models import get_fixture

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
MODEL_NAME = "tiny-olmoe"
CTX_SIZE = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    api_key: str | None = None
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="moestream-serve-", suffix=".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "moestream.server.cli", "serve", *self.args]
        if "MOESTREAM_PORT" not in self.env:
            cmd += ["--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **self.env},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def start(self, timeout_s: float = 90.0) -> ServerProcess:
        self.launch()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        output = self.output()  # stop() closes (and deletes) the log
        self.stop()
        raise AssertionError(f"server not healthy after {timeout_s} s:\n{output}")

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def signal(self, sig: signals.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-6000:]

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0,
                             timeout=120, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none",
                                  max_retries=0, timeout=120)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", headers={**self.headers(), **(headers or {})}, timeout=120,
                          **kwargs)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels without model_name): value}; asserts every sample
        carries model_name."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.name.startswith("moestream:"):
                    continue
                assert "model_name" in s.labels, f"{s.name} has no model_name label"
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                samples[(s.name, labels)] = s.value
        return samples


@pytest.fixture(scope="module")
def olmoe_gguf() -> Path:
    return get_fixture("olmoe").gguf_path


@pytest.fixture(scope="module")
def server(olmoe_gguf) -> ServerProcess:
    """The shared server: an API key, a batch of 16, every expert in host memory."""
    proc = ServerProcess(["--model", str(olmoe_gguf), "--api-key", API_KEY, "--served-model-name", MODEL_NAME,
                          "--max-batch", "16", "--ctx-size", str(CTX_SIZE)], api_key=API_KEY)
    yield proc.start()
    proc.stop()


DEMO_MODEL = "moestream-demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> ServerProcess:
    """`moestream serve --demo`: random weights, so only a grammar makes its output valid."""
    cache = tmp_path_factory.mktemp("cache")
    proc = ServerProcess(["--demo", "--max-batch", "4"], env={"XDG_CACHE_HOME": str(cache)})
    yield proc.start()
    proc.stop()
