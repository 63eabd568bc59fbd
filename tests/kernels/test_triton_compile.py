"""The kernels build for every compute capability in kernels/triton_configs.py, at the tile
configs that table selects there, with no register spills and no stack frame (ptxas -v of
the installed Triton).

The interpreter runs the kernels as numpy and never compiles them, so this is where code the
real compiler rejects, and tiles that spill on one GPU generation, show up on a machine
without a GPU. To stay within a few minutes on two cores it builds the decoders that most
often need the most registers (all 22 types, ptxas 12.9/13.4, 2026-11-30,
docs/TRITON-KERNELS.md): Q3_K (unaligned 110-byte blocks, split 6-bit scales) and Q5_1
(scale, offset and 5th bits per 32 columns) in the GEMM and grouped kernels, IQ3_S (grid
lookups; the one that spilled on sm_120 before its own entry), Q5_K in the GEMV, MXFP4
(gpt-oss's experts: an E8M0 scale built from bits, a table lookup per nibble);
`python -m bench.kernels_compile` builds every type.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import triton

from moestream.kernels.triton_configs import CAPABILITIES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
TYPES = ("Q3_K", "Q5_1", "IQ3_S", "Q5_K", "MXFP4")
BUILDS_PER_TYPE = 6  # GEMV at 1 and 4 rows, GEMM and grouped at 16 and 64


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton install bundles no ptxas to compile with")
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
def test_kernels_compile_without_spills(capability: int, tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "builds.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.kernels_compile", "--types", ",".join(TYPES),
         "--arch", str(capability), "--json", str(report)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert report.exists(), run.stdout + run.stderr
    builds = json.loads(report.read_text())
    assert len(builds) == BUILDS_PER_TYPE * len(TYPES), run.stdout
    assert {b["capability"] for b in builds} == {capability}
    spilled = [b for b in builds
               if b["stack_bytes"] or b["spill_store_bytes"] or b["spill_load_bytes"]]
    assert not spilled, run.stdout
    assert all(0 < b["registers"] <= 255 for b in builds), run.stdout
    assert run.returncode == 0, run.stdout + run.stderr
