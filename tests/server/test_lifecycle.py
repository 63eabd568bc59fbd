"""Start-up, back-pressure and shutdown of `moestream serve` as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest

from tests.fixtures.models import get_fixture
from tests.server.conftest import REPO_ROOT, ServerProcess, free_port


def wait_until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def running_and_waiting(server: ServerProcess) -> tuple[float, float]:
    m = server.metrics()
    return m[("moestream:num_requests_running", ())], m[("moestream:num_requests_waiting", ())]


def open_stream(server: ServerProcess, max_tokens: int, stack: ExitStack):
    """The SSE lines of a streaming greedy completion of exactly `max_tokens` tokens."""
    body = {"prompt": "once upon a time", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    response = stack.enter_context(httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60))
    assert response.status_code == 200
    return response.iter_lines()


def next_event(lines) -> str:
    for line in lines:
        if line.startswith("data: "):
            return line.removeprefix("data: ")
    raise AssertionError("the stream ended")


@pytest.fixture(scope="module")
def small_server(olmoe_gguf) -> ServerProcess:
    """One running and one waiting request at most; drains for up to 60 s on SIGTERM."""
    proc = ServerProcess(["--model", str(olmoe_gguf), "--max-batch", "1", "--max-waiting", "1",
                          "--ctx-size", "512", "--shutdown-grace", "60"])
    yield proc.start()
    proc.stop()


def test_full_queue_answers_503_with_retry_after(small_server):
    with ExitStack() as stack:
        first = open_stream(small_server, 400, stack)
        next_event(first)  # the first request runs
        open_stream(small_server, 400, stack)
        wait_until(lambda: running_and_waiting(small_server) == (1, 1), what="one running, one waiting")
        refused = httpx.post(f"{small_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "unavailable_error"
    wait_until(lambda: running_and_waiting(small_server) == (0, 0), what="the aborted requests to go")


def test_sigterm_lets_the_running_stream_finish_then_exits_0(small_server):
    with ExitStack() as stack:
        lines = open_stream(small_server, 60, stack)
        next_event(lines)
        small_server.signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{small_server.url}/health").status_code == 503, what="draining")
        refused = httpx.post(f"{small_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503
        events = []
        while (data := next_event(lines)) != "[DONE]":
            events.append(json.loads(data))
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 60, "the stream was cut short"
    assert small_server.wait(30) == 0, small_server.output()


def test_demo_serves_with_environment_configuration(tmp_path):
    port = free_port()
    demo = ServerProcess([], env={"MOESTREAM_DEMO": "1", "MOESTREAM_PORT": str(port), "XDG_CACHE_HOME": str(tmp_path),
                                  "MOESTREAM_SERVED_MODEL_NAME": "demo-model"}, port=port)
    try:
        demo.start()
        out = demo.client().chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 2 and out.model == "demo-model"
        assert "random weights" in demo.output()
        assert list(tmp_path.glob("moestream/demo/*.gguf")), "the demo model was not written to the cache"
        # The demo keeps half of its 4 x 16 experts in an expert cache, so the cache metrics move.
        metrics = demo.metrics()
        assert metrics[("moestream:expert_cache_slots", ())] == 32
        assert sum(v for (name, _), v in metrics.items() if name == "moestream:expert_cache_misses_total") > 0
    finally:
        demo.stop()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moestream.server.cli", "serve", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_missing_model_file_exits_2_before_binding():
    done = run_cli("--model", "/nonexistent/model.gguf", "--port", str(free_port()))
    assert done.returncode == 2
    assert "no such file" in done.stderr


def test_hub_model_while_offline_exits_2_saying_so(tmp_path):
    done = run_cli("--model", "hf:nobody/nothing/model.gguf", "--port", str(free_port()),
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert "offline" in done.stderr


def test_unknown_miss_policy_from_the_environment_exits_2(tmp_path):
    fixture = get_fixture("olmoe", "Q4_K_M")
    done = run_cli("--model", str(fixture.gguf_path), "--port", str(free_port()),
                   env={"MOESTREAM_MISS_POLICY": "sometimes"})
    assert done.returncode == 2, done.stderr
    assert "unknown miss policy 'sometimes'" in done.stderr and "auto, copy, cpu" in done.stderr
