"""bench/gpu_check.sh: its CPU rehearsal runs every phase to the end, and a phase that fails or
runs out of time never stops the ones after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import bench.gpu_check as gpu_check
from tests.conftest import REPO_ROOT

PHASES = ["smoke", "tests", "kernels", "offload"]


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_phase(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", "--out", str(out)], cwd=REPO_ROOT,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    result = json.loads((out / "gpu_check.json").read_text())
    phases = result["phases"]
    assert list(phases) == PHASES
    assert {name: p["status"] for name, p in phases.items()} == dict.fromkeys(PHASES, "ok"), (
        {name: p["error"] for name, p in phases.items()}, run.stdout[-2000:])
    assert run.returncode == 0
    smoke = phases["smoke"]["figures"]
    assert smoke["serve"]["chunks"] >= 1 and smoke["serve"]["text"]
    assert {"generate_t1", "generate_t0"} <= smoke.keys()
    tests = phases["tests"]["figures"]
    assert tests["tests"] > tests["skipped"] and tests["failures"] == tests["errors"] == 0
    kernels = phases["kernels"]["figures"]
    assert kernels["checks_failed"] == 0 and {r["kernel"] for r in kernels["rows"]} >= {"gemv", "gemm", "moe ffn"}
    (row,) = phases["offload"]["figures"]["rows"]
    assert row["policy"] == "auto" and 0 <= row["expert_hit_rate"] <= 1 and row["decode_tok_s"] > 0
    assert all(p["seconds"] <= p["limit_s"] + 5 for p in phases.values())
    md = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in md for name in PHASES)
    assert {f"{name}.log" for name in PHASES} <= {p.name for p in out.iterdir()}


def test_a_failed_phase_never_stops_the_next(tmp_path, monkeypatch):
    def failing(ctx):
        raise gpu_check.PhaseFailed("found something wrong", {"checked": 3})

    def slow(ctx):
        ctx.run([sys.executable, "-c", "import time; time.sleep(60)"], "a sleeper")

    def crashing(ctx):
        raise KeyError("a bug of the script")

    monkeypatch.setattr(gpu_check, "PHASES", [("smoke", failing), ("tests", slow), ("kernels", crashing),
                                              ("offload", lambda ctx: {"decode_tok_s": 1.5})])
    monkeypatch.setattr(gpu_check, "device_facts", lambda mode: {"gpu": None})
    mode = gpu_check.Mode(True, total_s=60, caps_s=dict.fromkeys(PHASES, 12), floor_s=10)
    start = time.monotonic()
    result = gpu_check.run_phases(mode, tmp_path, tmp_path, PHASES)
    assert time.monotonic() - start < 30  # the sleeper was stopped at its phase's limit
    statuses = {name: p["status"] for name, p in result["phases"].items()}
    assert statuses == {"smoke": "failed", "tests": "timeout", "kernels": "failed", "offload": "ok"}
    assert result["phases"]["smoke"]["figures"] == {"checked": 3}
    assert "KeyError" in result["phases"]["kernels"]["error"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["phases"]["offload"]["figures"] == {
        "decode_tok_s": 1.5}


def test_unknown_phase_is_refused(tmp_path, capsys):
    assert gpu_check.main(["--cpu", "--work", str(tmp_path), "--out", str(tmp_path), "--phases", "smoke,warp"]) == 2
    assert "warp" in capsys.readouterr().err
