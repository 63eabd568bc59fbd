"""A short, bounded fuzz of `moestream serve` as a hostile client would try it (issue 19).

    python bench/fuzz_server.py [--seed 0] [-- extra serve flags]

Starts its own `moestream serve --demo` on a free loopback port (nothing leaves the machine),
then sends a fixed budget of requests: hand-made bad bodies, randomly mutated valid bodies,
bodies over the size limit, 8 MiB prompts, half-sent requests, streams that hang up, and a
burst of --max-batch + --max-waiting requests. Prints one table: requests sent, answers by
status, server faults (5xx other than the queue's 503: must be 0), /health latency while
8 MiB prompts are handled, and the server's RSS before and after 20 rejected 8 MiB prompts.
Exits 1 if any server fault was seen or the server died.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil

MAX_BATCH, MAX_WAITING = 4, 4
REQUEST_TIMEOUT_S = 3.0
BIG_PROMPT_CHARS = 8 * 1024 * 1024 - 200  # the body stays just under the 8 MiB default limit
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]

# Each a (path, raw body) a client could send by mistake or on purpose.
BAD_BODIES: list[tuple[str, bytes]] = [(p, b) for p, b in [
    (CHAT, b""), (CHAT, b"{"), (CHAT, b"[]"), (CHAT, b"null"), (CHAT, b"123"), (CHAT, b'"x"'),
    (CHAT, b"\xff\xfe\x00"), (CHAT, b'{"messages": "hi"}'), (CHAT, b'{"messages": []}'),
    (CHAT, b'{"messages": [{}]}'), (CHAT, b'{"messages": [{"role": 1, "content": "x"}]}'),
    (CHAT, b'{"messages": [{"role": "user", "content": {"a": 1}}]}'),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    (CHAT, b'{"messages": [{"role": "user\\udfff", "content": "x"}]}'),
    (COMPLETIONS, b'{"prompt": "\\udc00x"}'), (COMPLETIONS, b'{"prompt": ["\\ud83d"]}'),
    (COMPLETIONS, b'{"prompt": [[1, 2], [3]]}'), (COMPLETIONS, b'{"prompt": [-1]}'),
    (COMPLETIONS, b'{"prompt": [99999999999999999999999]}'), (COMPLETIONS, b'{"prompt": []}'),
    (COMPLETIONS, b'{"prompt": ""}'), (COMPLETIONS, b'{"prompt": [1.5]}'), (COMPLETIONS, b'{"prompt": null}'),
    (COMPLETIONS, b'{"prompt": "a", "seed": 18446744073709551616}'),
    (COMPLETIONS, b'{"prompt": "a", "seed": -9223372036854775809}'),
    (COMPLETIONS, b'{"prompt": "a", "temperature": NaN}'), (COMPLETIONS, b'{"prompt": "a", "top_p": Infinity}'),
    (COMPLETIONS, b'{"prompt": "a", "temperature": 1e400}'), (COMPLETIONS, b'{"prompt": "a", "top_p": 0}'),
    (COMPLETIONS, b'{"prompt": "a", "max_tokens": 0}'), (COMPLETIONS, b'{"prompt": "a", "max_tokens": 1e30}'),
    (COMPLETIONS, b'{"prompt": "a", "stream": "yes"}'), (COMPLETIONS, b'{"prompt": "a", "max_tokens": "4"}'),
    (COMPLETIONS, b'{"prompt": "a", "logprobs": 21}'), (COMPLETIONS, b'{"prompt": "a", "stop": [1]}'),
    (COMPLETIONS, b'{"prompt": "a", "n": 2}'), (COMPLETIONS, b'{"prompt": "a", "echo": true}'),
    (COMPLETIONS, b'{"prompt": "a", "stream_options": "x"}'), (COMPLETIONS, b'{"prompt": "a", "top_k": -5}'),
    (COMPLETIONS, b'{"prompt": "a", "model": "gpt-9"}'), (COMPLETIONS, b'{"prompt": "a", "model": "\\ud800"}'),
    (COMPLETIONS, b'{"prompt": "' + b"[" * 100000 + b'"}'), (COMPLETIONS, b"[" * 100000),
    (COMPLETIONS, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    (CHAT, json.dumps({"messages": HI, "top_logprobs": 5}).encode()),
    (CHAT, json.dumps({"messages": HI * 5000, "max_tokens": 1}).encode()),
    ("/v1/embeddings", b'{"input": "x"}'), ("/v1/models/../../etc/passwd", b""), ("/v1/%ff", b"{}"),
]]

# Values a mutated field takes: wrong types, edges, garbage.
MUTATIONS = [None, True, False, 0, -1, 1, 2**63, -2**63 - 1, 2**70, 1e-38, 1e-46, 1e308, -1e308, 0.5, "", "x",
             "yes", "4", "\ud800", "a" * 10000, [], [1], ["x"], [[]], {}, {"a": 1}, [None], "<|im_start|>system"]
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stream", "stream_options", "n", "logprobs", "top_logprobs", "presence_penalty",
          "frequency_penalty", "ignore_eos", "echo", "best_of"]


@dataclass
class Tally:
    statuses: collections.Counter = field(default_factory=collections.Counter)
    faults: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, status: int, what: str) -> None:
        with self.lock:
            self.statuses[status] += 1
            if status >= 500 and status != 503:
                self.faults.append(f"{status} {what}")

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, extra: list[str], log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moestream.server.cli", "serve", "--demo", "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(MAX_BATCH), "--max-waiting", str(MAX_WAITING),
           "--request-timeout", str(REQUEST_TIMEOUT_S), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; log: {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"the server was not healthy after 180 s; log: {log.name}")


def raw_request(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    """Send exactly these bytes; the status of the answer (0: the connection closed)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head + body)
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            reply += chunk
    return int(reply.split()[1])


def mutated_body(rng: random.Random) -> tuple[str, bytes]:
    path = rng.choice([CHAT, COMPLETIONS])
    body: dict = {"messages": HI} if path == CHAT else {"prompt": "hello"}
    body.update(max_tokens=2, ignore_eos=True)
    for name in rng.sample(FIELDS, rng.randint(1, 3)):
        body[name] = rng.choice(MUTATIONS)
    return path, json.dumps(body).encode("utf-8", "surrogatepass")


def run_bad_bodies(port: int, tally: Tally, rng: random.Random, n_mutated: int) -> None:
    for path, body in BAD_BODIES:
        tally.record(raw_request(port, path, body), f"{path} {body[:80]!r}")
    tally.record(raw_request(port, "/v1/models", b"", {"Authorization": "Bearer \u00e9".encode().decode("latin-1")}),
                 "non-ASCII Authorization")
    for _ in range(n_mutated):
        path, body = mutated_body(rng)
        tally.record(raw_request(port, path, body), f"{path} {body[:120]!r}")


def run_oversized(port: int, tally: Tally) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n{" % (9 * 1024 * 1024))
    for _ in range(3):  # the head and a little of a 9 MiB body; the answer must not wait for the rest
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head + b" " * 65536)
            tally.record(int(sock.recv(4096).split()[1]), "9 MiB body")
    # A chunked body that grows past the limit: no Content-Length to refuse it by.
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * (1024 * 1024)
        try:
            for _ in range(10):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            status = int(sock.recv(4096).split()[1])
        except ConnectionResetError:  # it answered and closed while we sent: the kernel reset it
            status = 0
        tally.record(status, "chunked body over the limit")


def big_prompt_body() -> bytes:
    return json.dumps({"prompt": "a" * BIG_PROMPT_CHARS, "max_tokens": 2}).encode()


def health_latency_under_big_prompts(port: int, tally: Tally, n_big: int) -> list[float]:
    body = big_prompt_body()
    done = threading.Event()

    def send() -> None:
        for _ in range(n_big):
            tally.record(raw_request(port, COMPLETIONS, body), "8 MiB prompt")
        done.set()

    latencies_s = []
    with httpx.Client() as client:
        client.get(f"http://127.0.0.1:{port}/health")
        threading.Thread(target=send, daemon=True).start()
        while not done.is_set():
            start_s = time.perf_counter()
            tally.record(client.get(f"http://127.0.0.1:{port}/health").status_code, "/health")
            latencies_s.append(time.perf_counter() - start_s)
            time.sleep(0.005)
    return sorted(latencies_s)


def rss_after_rejected(port: int, pid: int, tally: Tally, n: int) -> tuple[int, int]:
    body = big_prompt_body()
    before = psutil.Process(pid).memory_info().rss
    for _ in range(n):
        tally.record(raw_request(port, COMPLETIONS, body), "8 MiB prompt (RSS)")
    time.sleep(1)
    return before, psutil.Process(pid).memory_info().rss


def run_disconnects(port: int, tally: Tally, n: int) -> None:
    body = json.dumps({"prompt": "tell me a story", "max_tokens": 1000, "ignore_eos": True, "stream": True}).encode()
    for i in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            reply = sock.recv(4096)
            tally.record(int(reply.split()[1]), "stream then hang up")
            if i % 2:  # half hang up at once, half mid-stream
                sock.recv(4096)


def run_burst(port: int, tally: Tally, n: int) -> None:
    body = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True}

    def one() -> None:
        tally.record(httpx.post(f"http://127.0.0.1:{port}{COMPLETIONS}", json=body, timeout=120).status_code, "burst")

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_half_sent(port: int, n: int) -> tuple[int, float]:
    """n connections that stop halfway (head or body); how many the server closed, how fast."""
    socks = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S + 10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le" if i % 2 else
                     b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"pro")
        socks.append(sock)
    start_s, closed = time.monotonic(), 0
    for sock in socks:
        try:
            while sock.recv(4096):
                pass
            closed += 1
        except OSError:
            pass
        sock.close()
    return closed, time.monotonic() - start_s


def running_requests(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    line = next(l for l in text.splitlines() if l.startswith("moestream:num_requests_running"))
    return float(line.rsplit(" ", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mutated", type=int, default=200, help="randomly mutated bodies to send")
    parser.add_argument("serve_args", nargs="*", help="extra flags for `moestream serve` (after --)")
    args = parser.parse_args()
    port, tally = free_port(), Tally()
    log = tempfile.NamedTemporaryFile("w+", prefix="fuzz-server-", suffix=".log", delete=False)
    proc = start_server(port, args.serve_args, log)
    try:
        run_bad_bodies(port, tally, random.Random(args.seed), args.mutated)
        run_oversized(port, tally)
        latencies_s = health_latency_under_big_prompts(port, tally, 5)
        rss_before, rss_after = rss_after_rejected(port, proc.pid, tally, 20)
        run_disconnects(port, tally, 16)
        run_burst(port, tally, MAX_BATCH + MAX_WAITING)
        closed, closed_in_s = run_half_sent(port, 20)
        time.sleep(1)
        leaked = running_requests(port)
        alive = proc.poll() is None and httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    faults = len(tally.faults)
    rows = [
        ("requests sent", f"{tally.sent} (+20 half-sent connections)"),
        ("answers by status", ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items()))),
        ("server faults (5xx other than 503)", str(faults)),
        ("/health latency under 8 MiB prompts", f"p50 {1e3 * statistics.median(latencies_s):.1f} ms, "
         f"p95 {1e3 * latencies_s[int(0.95 * len(latencies_s))]:.1f} ms, max {1e3 * latencies_s[-1]:.1f} ms "
         f"({len(latencies_s)} polls)"),
        ("RSS before / after 20 rejected 8 MiB prompts", f"{rss_before / 2**20:.0f} MiB / {rss_after / 2**20:.0f} MiB"),
        ("half-sent requests closed", f"{closed} of 20 within {closed_in_s:.1f} s (--request-timeout {REQUEST_TIMEOUT_S:g})"),
        ("requests still running after the hang-ups", f"{leaked:.0f}"),
        ("server alive and healthy at the end", "yes" if alive else "NO"),
    ]
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for fault in tally.faults[:20]:
        print("fault:", fault, file=sys.stderr)
    print(f"server log: {log.name}", file=sys.stderr)
    return 1 if faults or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
