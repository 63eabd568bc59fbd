"""`moestream inspect --json`: the memory plan of a full-size model from a header-only
synthetic file (`synth --no-weights`), checked against the tensor sizes gguf's own reader
gives, on a machine without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from moestream.engine.loader import open_gguf
from moestream.tools.synth import get_preset, write_synthetic

GiB = 2**30


def moestream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moestream.server.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def qwen3_header_only(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "qwen3-30b-a3b-q4km.gguf"
    result = moestream("synth", "--arch", "qwen3moe", "--preset", "qwen3-30b-a3b", "--quant", "Q4_K_M",
                       "-o", str(path), "--no-weights")
    assert result.returncode == 0, result.stderr
    return path


def test_no_weights_writes_the_full_size_on_almost_no_disk(qwen3_header_only):
    reader = gguf.GGUFReader(qwen3_header_only)
    data_end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert os.path.getsize(qwen3_header_only) >= data_end > 17 * 10**9
    assert os.stat(qwen3_header_only).st_blocks * 512 < 64 * 2**20, "the data must be a sparse hole"


def test_qwen3_30b_at_4gib_keeps_resident_weights_quantized_and_sums_within_the_budget(qwen3_header_only):
    result = moestream("inspect", str(qwen3_header_only), "--vram-budget", "4GiB", "--ctx-size", "4096",
                       "--max-batch", "1", "--plan-for", "cuda", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    reader = gguf.GGUFReader(qwen3_header_only)
    routed = sum(int(t.n_bytes) for t in reader.tensors if t.name.endswith("_exps.weight"))
    kept = [t for t in reader.tensors if not t.name.endswith("_exps.weight") and t.name != "token_embd.weight"]
    as_stored = sum(int(t.n_bytes) for t in kept)
    assert plan["device"] == "cuda" and plan["fits"] is True
    assert plan["budget_bytes"] == 4 * GiB
    assert plan["resident_bytes"] == as_stored < 0.8 * GiB  # quantized, as stored (dense fp16: 2.29 GiB)
    assert plan["routed_expert_bytes"] == routed
    assert abs(plan["pinned_host_bytes"] - routed) <= 0.02 * routed
    # K and V for 4096 tokens, 48 layers, 4 KV heads of 128, f16
    assert plan["kv_bytes"] == 2 * 48 * 4096 * 4 * 128 * 2
    total = plan["resident_bytes"] + plan["kv_bytes"] + plan["workspace_bytes"] + plan["n_slots"] * plan["slot_bytes"]
    assert total <= plan["budget_bytes"]
    assert plan["n_slots"] > 500  # the old dense plan left 70 slots


def test_a_budget_too_small_still_prints_the_plan_with_the_minimum_and_the_flags(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_synthetic(path, get_preset("qwen3moe", "tiny"), "Q4_K_M", random_weights=False, progress=False)
    result = moestream("inspect", str(path), "--vram-budget", "1MiB", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["fits"] is False and plan["n_slots"] == 0 and plan["min_budget_bytes"] > 2**20
    text = moestream("inspect", str(path), "--vram-budget", "1MiB", "--plan-for", "cuda").stdout
    assert "memory plan on a CUDA device" in text and "DOES NOT FIT" in text
    assert str(plan["min_budget_bytes"]) in text and "--vram-budget" in text and "--kv-tokens" in text


def test_plan_for_cpu_pins_nothing(tmp_path):
    """No GPU planned for: no pinned store, no cuBLAS workspace."""
    path = tmp_path / "tiny.gguf"
    write_synthetic(path, get_preset("qwen2moe", "tiny"), "Q4_K_M", random_weights=False, progress=False)
    result = moestream("inspect", str(path), "--vram-budget", "64MiB", "--plan-for", "cpu", "--json")
    plan = json.loads(result.stdout)
    assert plan["device"] == "cpu" and plan["pinned_host_bytes"] == 0 and "cublas" not in plan["workspace_parts"]


def test_header_only_file_opens_and_plans_as_the_weighted_one(tmp_path):
    preset = get_preset("olmoe", "tiny")
    weighted, hollow = tmp_path / "weighted.gguf", tmp_path / "hollow.gguf"
    write_synthetic(weighted, preset, "Q4_K_M", progress=False)
    write_synthetic(hollow, preset, "Q4_K_M", random_weights=False, progress=False)
    assert os.path.getsize(weighted) == os.path.getsize(hollow)
    assert open_gguf(hollow).config == open_gguf(weighted).config  # our loader's checks pass
    plans = [moestream("inspect", str(p), "--vram-budget", "64MiB", "--json").stdout for p in (weighted, hollow)]
    assert json.loads(plans[0]) | {"file": ""} == json.loads(plans[1]) | {"file": ""}
