"""A hostile client cannot hurt the server or other clients (issue 19): overflowing sampling
settings, huge or half-sent bodies, malformed text and headers, bursts, and a drain that
runs out of time. Each test fails on the commit the issue was filed against (cefb909)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.models import get_fixture, sample_token_ids
from tests.server.conftest import REPO_ROOT, ServerProcess, free_port

KEY = "reliable-key"
NAME = "tiny"
MAX_BATCH, MAX_WAITING = 3, 2
REQUEST_TIMEOUT_S = 2.0
BIG_PROMPT_CHARS = 8 * 1024 * 1024 - 200  # the body stays just under the default 8 MiB limit


@pytest.fixture(scope="module")
def srv(olmoe_gguf) -> ServerProcess:
    proc = ServerProcess(["--model", str(olmoe_gguf), "--api-key", KEY, "--served-model-name", NAME,
                          "--max-batch", str(MAX_BATCH), "--max-waiting", str(MAX_WAITING), "--ctx-size", "512",
                          "--request-timeout", str(REQUEST_TIMEOUT_S)], api_key=KEY)
    yield proc.start()
    proc.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stream_events(srv: ServerProcess, body: dict) -> list[str]:
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, headers=srv.headers(),
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def stream_text(events: list[str]) -> str:
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])


# -- 1: sampling settings that would overflow ----------------------------------------
def test_tiny_temperature_and_top_p_are_greedy_for_every_stream(srv):
    prompt = sample_token_ids(get_fixture("olmoe"), 6, seed=61)
    base = {"model": NAME, "prompt": prompt, "max_tokens": 8, "ignore_eos": True}
    greedy = stream_text(stream_events(srv, {**base, "temperature": 0}))

    async def all_at_once() -> list[list[str]]:
        settings = [{"temperature": 1e-38}, {"top_p": 1e-46}, {"temperature": 1e-38, "seed": 3}, {"temperature": 0}]
        return await asyncio.gather(*(asyncio.to_thread(stream_events, srv, {**base, **s}) for s in settings))

    for events in asyncio.run(all_at_once()):
        assert events[-1] == "[DONE]", events[-2:]
        assert stream_text(events) == greedy


# -- 2: bounded bodies, the event loop stays free --------------------------------------
def test_a_body_over_the_limit_gets_413_before_it_is_sent(srv):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {9 * 1024 * 1024}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(head)  # and not one byte of the body
        status, body = _read_response(sock)
    assert status == 413, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and "--max-request-bytes" in error["message"]


def _post_big_prompts_in_a_process(srv: ServerProcess, n: int) -> subprocess.Popen:
    """A separate process, so the client's own work does not slow the /health poller."""
    script = (f"import httpx\nbody = {{'prompt': 'a' * {BIG_PROMPT_CHARS}, 'max_tokens': 2}}\n"
              f"for _ in range({n}):\n"
              f"    r = httpx.post('{srv.url}/v1/completions', json=body, timeout=120,"
              f" headers={{'Authorization': 'Bearer {KEY}'}})\n"
              f"    print(r.status_code, flush=True)\n")
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_health_answers_within_100ms_while_an_8mib_prompt_is_handled(srv):
    prefill = sample_token_ids(get_fixture("olmoe"), 500, seed=62)  # a long prefill runs meanwhile
    with httpx.Client() as client:
        client.get(f"{srv.url}/health")
        sender = _post_big_prompts_in_a_process(srv, 4)
        long = subprocess.Popen([sys.executable, "-c", f"import httpx; httpx.post('{srv.url}/v1/completions', "
                                 f"json={{'prompt': {prefill}, 'max_tokens': 4}}, timeout=120, "
                                 f"headers={{'Authorization': 'Bearer {KEY}'}})"])
        latencies_s = []
        while sender.poll() is None or long.poll() is None:
            start_s = time.perf_counter()
            assert client.get(f"{srv.url}/health").status_code == 200
            latencies_s.append(time.perf_counter() - start_s)
            time.sleep(0.01)
    assert sender.stdout.read().split() == ["400"] * 4, "the 8 MiB prompt is longer than the context"
    # Before the fix it stalled 12-15 s. The 95th percentile, not the maximum: the machine the
    # suite runs on may be shared, and a busy neighbour can delay any one poll.
    latencies_s.sort()
    assert len(latencies_s) > 10 and latencies_s[int(0.95 * len(latencies_s))] < 0.1, latencies_s[-5:]
    assert latencies_s[-1] < 0.5, latencies_s[-5:]


def test_rejected_large_prompts_leave_no_memory_behind(srv):
    before = rss_bytes(srv.proc.pid)
    sender = _post_big_prompts_in_a_process(srv, 10)
    assert sender.communicate(timeout=120)[0].split() == ["400"] * 10
    grown = rss_bytes(srv.proc.pid) - before
    assert grown < 64 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB after 10 rejected 8 MiB prompts"


# -- 3: client mistakes are 4xx, never 500 ----------------------------------------------
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, param", [
    (CHAT, '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages"),
    (COMPLETIONS, '{"prompt": "a\\udc00"}', "prompt"),
    (COMPLETIONS, '{"prompt": "a", "stop": ["\\ud83d"]}', "stop"),
    (COMPLETIONS, json.dumps({"prompt": "a", "seed": 2**64}), "seed"),
    (COMPLETIONS, json.dumps({"prompt": "a", "seed": -2**63 - 1}), "seed"),
    (CHAT, json.dumps({"messages": HI, "stream": "yes"}), "stream"),
    (CHAT, json.dumps({"messages": HI, "max_tokens": "4"}), "max_tokens"),
    (COMPLETIONS, json.dumps({"prompt": "a", "temperature": "0.5"}), "temperature"),
    (COMPLETIONS, json.dumps({"prompt": [1, 2.5]}), "prompt"),
    (COMPLETIONS, '{"prompt": "a", "temperature": NaN}', "temperature"),
], ids=["surrogate-content", "surrogate-prompt", "surrogate-stop", "seed-above-uint64", "seed-below-int64",
        "stream-yes", "max-tokens-string", "temperature-string", "float-token", "temperature-nan"])
def test_client_mistakes_are_400_and_the_connection_stays_open(srv, path, body, param):
    with httpx.Client(headers={**srv.headers(), "content-type": "application/json"}) as client:
        response = client.post(f"{srv.url}{path}", content=body.encode())
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["param"]) == ("invalid_request_error", param)
        assert response.headers.get("connection") != "close"
        assert client.get(f"{srv.url}/v1/models").status_code == 200


def test_a_non_ascii_authorization_header_is_401(srv):
    for value in ("Bearer \u00e9t\u00e9".encode(), b"Bearer \xff\xfe"):
        response = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": value})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"


def test_an_unexpected_error_is_one_traceback_and_a_500_on_a_live_connection(caplog):
    import threading

    import uvicorn
    from fastapi import FastAPI

    from moestream.server.errors import CatchAll, install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a server bug")

    app.add_middleware(CatchAll)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        with caplog.at_level("INFO"), socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            replies = []
            for _ in range(2):  # the same connection twice: the first 500 must not close it
                sock.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
                replies.append(_read_response(sock))
        for status, body in replies:
            assert status == 500
            assert json.loads(body)["error"]["type"] == "server_error"
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert len(tracebacks) == 2, [r.getMessage() for r in tracebacks]  # one per request
    finally:
        server.should_exit = True
        thread.join(10)


def _read_response(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(4096)
    return int(head.split()[1]), body.decode()


def test_openapi_describes_what_the_server_answers(srv):
    schema = httpx.get(f"{srv.url}/openapi.json").json()
    assert "422" not in json.dumps(schema) and "HTTPValidationError" not in schema["components"]["schemas"]
    for path in (CHAT, COMPLETIONS):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "503"} <= set(responses)
        assert "text/event-stream" in responses["200"]["content"]
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "404" in schema["paths"]["/v1/models/{model}"]["get"]["responses"]
    assert "503" in schema["paths"]["/health"]["get"]["responses"]


# -- 5: slow clients, bursts, empty keys, drains -------------------------------------
def test_half_sent_requests_are_cut_off(srv):
    half_head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"
    half_body = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ").encode()
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=REQUEST_TIMEOUT_S + 5) for _ in range(2)]
    try:
        start_s = time.monotonic()
        socks[0].sendall(half_head)
        socks[1].sendall(half_body)
        assert socks[0].recv(4096) == b"", "a stalled request head must end in a closed connection"
        status, body = _read_response(socks[1])
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert socks[1].recv(4096) == b""
        assert time.monotonic() - start_s < REQUEST_TIMEOUT_S + 3
    finally:
        for sock in socks:
            sock.close()


def test_a_burst_of_batch_plus_queue_is_all_admitted(srv):
    async def burst() -> list[int]:
        async with httpx.AsyncClient(headers=srv.headers(), timeout=60) as client:
            body = {"prompt": "hello", "max_tokens": 8, "ignore_eos": True}
            responses = await asyncio.gather(*(client.post(f"{srv.url}/v1/completions", json=body)
                                               for _ in range(MAX_BATCH + MAX_WAITING)))
            return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * (MAX_BATCH + MAX_WAITING)


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moestream.server.cli", "serve", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_empty_api_key_is_refused_at_start(how, tmp_path):
    args, env = ["--demo", "--port", str(free_port())], {"XDG_CACHE_HOME": str(tmp_path)}
    if how == "flag":
        args += ["--api-key", ""]
    else:
        env["MOESTREAM_API_KEY"] = ""
    done = run_serve(*args, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "API key is empty" in done.stderr


def test_streams_cut_at_the_end_of_a_drain_end_with_an_error_event(olmoe_gguf):
    # a grace far shorter than 500 tokens take: with 1 s the tiny model finished them first
    proc = ServerProcess(["--model", str(olmoe_gguf), "--ctx-size", "512", "--shutdown-grace", "0.2",
                          "--kernels", "torch"]).start()
    try:
        body = {"prompt": "once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            next(lines)
            proc.signal(signal.SIGTERM)
            events = [line.removeprefix("data: ") for line in lines]
        assert events and events[-1] != "[DONE]", "the stream was not cut by the drain"
        error = json.loads(events[-1])["error"]
        assert error["type"] == "unavailable_error" and "shut down" in error["message"]
        assert proc.wait(30) == 0, proc.output()
    finally:
        proc.stop()
