"""`moestream bench --profile`: the per-part breakdown of a decode token (tools/decode_profile.py).

The parts are timed exclusively inside each `Engine.step`; what they must match is the
decode step time measured independently, between the tokens `generate` yields. A probe that
missed a part of the step, or counted a nested call twice, moves the sum away from it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from moestream.engine import Engine, SamplingParams
from moestream.engine.engine import Engine as EngineClass
from moestream.tools.bench import add_bench_args, bench_main
from moestream.tools.decode_profile import (EXPERTS, REQUIRED_PARTS, STEP_MEASURED, StepProfiler,
                                            decode_breakdown_ms)
from moestream.tools.synth import get_preset, write_synthetic

GEN_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "tiny-olmoe-Q4_K_M.gguf"
    write_synthetic(path, get_preset("olmoe", "tiny"), "Q4_K_M", progress=False)
    return path


def test_parts_add_up_to_the_decode_step(tiny_synth: Path) -> None:
    engine = Engine.from_gguf(tiny_synth, ctx_size=64, max_batch=1, kernel_backend="q8")
    step = EngineClass.step
    params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)
    list(engine.generate(list(range(10, 26)), params))  # warm-up: kernels built, pages touched
    profiler = StepProfiler(engine)
    with profiler.installed():
        times = [time.perf_counter() for _ in engine.generate(list(range(10, 26)), params)]
    assert EngineClass.step is step, "the probes must be removed after profiling (zero cost without --profile)"
    breakdown = decode_breakdown_ms(profiler.steps, times)
    missing = [p for p in REQUIRED_PARTS if not breakdown.get(p, 0) > 0]
    assert not missing, f"parts not timed: {missing}"
    parts = sum(v for k, v in breakdown.items() if k != STEP_MEASURED)
    measured = breakdown[STEP_MEASURED]
    assert abs(parts - measured) <= 0.1 * measured, f"parts {parts:.3f} ms vs step {measured:.3f} ms"
    assert len(profiler.steps) == GEN_TOKENS  # the prefill step, then one step per further token


def test_bench_prints_the_profile(tiny_synth: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    args = parser.parse_args(["--model", str(tiny_synth), "--device", "cpu", "--threads", "1", "--kernels", "q8",
                              "--prompt-tokens", "16", "--gen-tokens", "6", "--repeat", "1", "--warmup", "1",
                              "--profile"])
    assert bench_main(args) == 0
    out = capsys.readouterr().out
    for part in (*REQUIRED_PARTS, "sum of the parts", STEP_MEASURED):
        assert part in out, part
    row = next(line for line in out.splitlines() if line.startswith(EXPERTS))
    assert float(row.split()[-2]) > 0  # ms of the expert kernels


def test_hybrid_parts_add_up_to_the_decode_step(tmp_path: Path) -> None:
    """qwen35moe: the DeltaNet recurrence and its gates are parts of their own, the mixers'
    projections count as attention projections, and the parts still add up to the step."""
    from moestream.tools.decode_profile import DELTANET, DELTANET_GATES, SHARED

    path = tmp_path / "tiny-qwen35moe-Q4_K_M.gguf"
    write_synthetic(path, get_preset("qwen35moe", "tiny"), "Q4_K_M", progress=False)
    engine = Engine.from_gguf(path, ctx_size=64, max_batch=1, kernel_backend="q8")
    params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)
    list(engine.generate(list(range(10, 26)), params))
    profiler = StepProfiler(engine)
    with profiler.installed():
        times = [time.perf_counter() for _ in engine.generate(list(range(10, 26)), params)]
    breakdown = decode_breakdown_ms(profiler.steps, times)
    missing = [p for p in (*REQUIRED_PARTS, SHARED, DELTANET, DELTANET_GATES) if not breakdown.get(p, 0) > 0]
    assert not missing, f"parts not timed: {missing}"
    parts = sum(v for k, v in breakdown.items() if k != STEP_MEASURED)
    measured = breakdown[STEP_MEASURED]
    assert abs(parts - measured) <= 0.1 * measured, f"parts {parts:.3f} ms vs step {measured:.3f} ms"
