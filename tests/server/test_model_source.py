"""`--model hf:...` references that could name a path outside the repository are refused
with one line and exit code 2 before anything is downloaded (issue 19, finding 4: today
`hf:../../x` ends in a traceback and exit code 1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moestream.kernels.errors import MoestreamError
from moestream.server.model_source import ModelSource

TRICKS = [
    "hf:../../x",
    "hf:../../x.gguf",
    "hf:/etc/passwd",
    "hf:owner/repo/../../../etc/passwd",
    "hf:owner/repo/./model.gguf",
    "hf:owner/repo//model.gguf",
    "hf:owner//repo/model.gguf",
    "hf:owner/repo/",
    "hf:owner/repo/sub\\..\\model.gguf",
    "hf:..owner/repo/model.gguf",
    "hf:own er/repo/model.gguf",
    "hf:owner/repo",
    "hf:",
]


@pytest.mark.parametrize("spec", TRICKS)
def test_path_tricks_are_refused_before_any_download(spec):
    with pytest.raises(MoestreamError, match="hf:OWNER/REPO/FILE.gguf"):
        ModelSource(spec).check()


@pytest.mark.parametrize("spec, repo_id, filename", [
    ("hf:Qwen/Qwen3-30B-A3B-GGUF/Qwen3-30B-A3B-Q4_K_M.gguf", "Qwen/Qwen3-30B-A3B-GGUF",
     "Qwen3-30B-A3B-Q4_K_M.gguf"),
    ("hf:unsloth/Mixtral-8x7B-v0.1-GGUF/Q4_K_M/model-00001-of-00002.gguf", "unsloth/Mixtral-8x7B-v0.1-GGUF",
     "Q4_K_M/model-00001-of-00002.gguf"),
    ("hf:a.b_c/d-e.f/x..y.gguf", "a.b_c/d-e.f", "x..y.gguf"),  # ".." inside a name is no path
])
def test_real_references_split_into_repo_and_file(spec, repo_id, filename):
    assert ModelSource(spec)._hub_parts() == (repo_id, filename)


def test_serve_exits_2_with_one_line():
    done = subprocess.run([sys.executable, "-m", "moestream.server.cli", "serve", "--model", "hf:../../x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "'..'" in lines[0]
