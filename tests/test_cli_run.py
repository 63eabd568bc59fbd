"""`moestream generate` as a user runs it: llama.cpp-like timings on stderr, the CPU thread
count reaching torch (and through its intra-op pool the compiled kernels), and the
one-time kernel build announced before and after."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import llama_cpp
import psutil
import pytest
import torch

from moestream.engine.engine_config import default_threads
from moestream.server.cli import main
from tests.fixtures.models import get_fixture

_TIMING = re.compile(r"moestream: +(?P<what>[a-z ]+?) = +(?P<ms>[\d.]+) ms(?: / +(?P<n>\d+) tokens"
                     r" \( *(?P<per_token_ms>[\d.]+) ms per token, +(?P<tok_s>[\d.]+) tokens per second\))?$")


def test_generate_ends_with_load_prompt_and_decode_timings():
    fixture = get_fixture("olmoe", "Q4_K_M")
    prompt, max_tokens = "hello there, how are you", 6
    done = subprocess.run([sys.executable, "-m", "moestream.server.cli", "generate", "-m", str(fixture.gguf_path),
                           "-p", prompt, "-n", str(max_tokens), "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    timings = {m["what"]: m for m in map(_TIMING.match, done.stderr.splitlines()) if m}
    assert set(timings) == {"load time", "prompt eval time", "decode time", "total time"}, done.stderr
    vocab = llama_cpp.Llama(model_path=str(fixture.gguf_path), vocab_only=True, verbose=False)
    assert int(timings["prompt eval time"]["n"]) == len(vocab.tokenize(prompt.encode(), add_bos=True))
    assert 0 <= int(timings["decode time"]["n"]) <= max_tokens - 1
    for what in ("prompt eval time", "decode time"):
        m = timings[what]
        if int(m["n"]):
            # printed to 2 decimals: a slow run's 0.22 tok/s is 2% off its exact rate
            assert float(m["tok_s"]) == pytest.approx(1000 * int(m["n"]) / float(m["ms"]), rel=0.01, abs=0.006)
            assert float(m["per_token_ms"]) == pytest.approx(float(m["ms"]) / int(m["n"]), rel=0.01, abs=0.006)
    parts_ms = sum(float(timings[w]["ms"]) for w in ("load time", "prompt eval time", "decode time"))
    assert float(timings["total time"]["ms"]) == pytest.approx(parts_ms, abs=0.05)
    assert "loaded in" in done.stderr and "CPU threads: 1" in done.stderr


def test_threads_flag_sets_torch_threads_for_every_thread(monkeypatch):
    """The kernels run in torch's intra-op pool (at::parallel_for), which takes its size from
    torch's thread count in whichever thread calls them: the server's loader thread and the
    hybrid policy's CPU worker are not the main thread."""
    before = torch.get_num_threads()
    try:
        fixture = get_fixture("olmoe", "Q4_K_M")
        assert main(["--log-level", "WARNING", "generate", "-m", str(fixture.gguf_path), "-p", "hi", "-n", "2",
                     "--threads", "3"]) == 0
        seen = []
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
        assert torch.get_num_threads() == 3 and seen == [3]
    finally:
        torch.set_num_threads(before)


def test_default_threads_are_omp_num_threads_else_the_physical_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == min(psutil.cpu_count(logical=False), len(psutil.Process().cpu_affinity()))


def test_kernel_build_is_announced_before_and_after_only_when_it_builds(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    from moestream.kernels.cpu import build

    def fake_load(name: str, build_directory: str, **kwargs):
        (build.Path(build_directory) / f"{name}.so").write_bytes(b"")  # what a finished build leaves
        return name

    monkeypatch.setattr(build, "CACHE_ROOT", tmp_path)
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    caplog.set_level("INFO", logger=build.__name__)
    build.compile_extension()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[0].startswith("building") and messages[1].startswith("built")
    caplog.clear()
    build.compile_extension()
    assert not caplog.records
