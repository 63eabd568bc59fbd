"""The kernels build for an H100 (sm_90) with the installed Triton, without register spills.

The interpreter runs the kernels as numpy and never compiles them, so this is where code the
real compiler rejects shows up on a machine without a GPU. Two types cover the unaligned
210-byte blocks (Q6_K) and the grid lookups (IQ3_S); `python -m bench.kernels_compile`
builds every type.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import triton

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton install bundles no ptxas to compile with")
def test_kernels_compile_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "bench.kernels_compile", "--types", "Q6_K,IQ3_S"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all builds fit in registers" in run.stdout
    assert run.stdout.count("_kernel ") == 12, run.stdout  # 6 builds per type
