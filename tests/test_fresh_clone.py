"""The suite runs where the data beside the checkout and llama-cpp-python are absent (a fresh
clone, a GPU machine's image): the tests that need them skip, each saying why."""

import os
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT

NEEDS_DATA = ["tests/engine/test_replay.py", "tests/engine/test_tokenizer.py"]
NEEDS_LLAMA_CPP = ["tests/fixtures/test_fixtures.py::test_llama_cpp_matches_transformers_on_f32",
                   "tests/fixtures/test_fixtures.py::test_vocab_round_trips_through_llama_cpp"]


def _pytest(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "MOESTREAM_EXTRA_VOCAB_DIR"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=REPO_ROOT, env={**environ, **env}, capture_output=True, text=True, timeout=600)


def test_without_the_shared_data_those_tests_skip_saying_why(tmp_path):
    run = _pytest(NEEDS_DATA, MOESTREAM_SHARED_DATA=str(tmp_path / "absent"))
    assert run.returncode == 0, run.stdout[-3000:]
    assert "failed" not in run.stdout and "error" not in run.stdout.lower()
    assert "needs the shared data folder" in run.stdout and "no llama.cpp tokenizer test vectors" in run.stdout
    assert " passed" in run.stdout  # the tests that need no data still ran


def test_without_llama_cpp_its_comparisons_skip_saying_why(tmp_path):
    blocker = tmp_path / "llama_cpp"
    blocker.mkdir()
    (blocker / "__init__.py").write_text('raise ModuleNotFoundError("no llama_cpp here", name="llama_cpp")\n')
    run = _pytest([*NEEDS_LLAMA_CPP, "tests/engine/test_sampler.py"],
                  PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert run.returncode == 0, run.stdout[-3000:]
    skips = re.findall(r"SKIPPED \[(\d+)\] [^\n]*: ([^\n]*)", run.stdout)
    assert skips and {reason for _, reason in skips} == {"llama-cpp-python (the llama.cpp reference) is not installed"}
    assert f"{sum(int(n) for n, _ in skips)} skipped" in run.stdout and " passed" in run.stdout
