"""The engine under each miss policy gives exactly the all-resident results, on a plain CPU
"device" and behind a simulated host->device link; the counters say where misses went."""

import math

import pytest
import torch

from moestream.engine import Engine, SamplingParams
from moestream.engine.calibrate import measure_rates
from moestream.engine.model import expert_ffn
from tests.fixtures.models import ARCHS, get_fixture, sample_token_ids


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["auto", "copy", "cpu"])
def test_every_policy_is_bitwise_identical_to_resident(engine_for, arch, policy):
    fixture = get_fixture(arch, "Q4_K_M")
    ids = sample_token_ids(fixture, 24, seed=31)
    resident = engine_for(arch, "Q4_K_M").score(ids)
    slots = 2 * engine_for(arch, "Q4_K_M").config.n_layers
    for link in (None, 2.0):
        engine = Engine.from_gguf(fixture.gguf_path, vram_budget="1GiB", max_cached_experts=slots,
                                  miss_policy=policy, simulate_link_gbps=link)
        start_up = engine.stats()["bytes_to_device"]  # cpu and auto fill the slots at start
        assert torch.equal(engine.score(ids), resident)
        s = engine.stats()
        assert s["expert_misses"] == s["misses_copied"] + s["misses_on_cpu"] > 0
        assert s["expert_lookups"] == s["expert_hits"] + s["expert_misses"]
        if policy == "copy":
            assert s["misses_on_cpu"] == 0
        if policy == "cpu":
            assert s["misses_copied"] == 0 and s["bytes_to_device"] == start_up and s["cpu_compute_s"] > 0


def test_int8_kernels_on_both_sides_match_resident(engine_for):
    fixture = get_fixture("qwen2moe", "Q4_K_M")
    ids = sample_token_ids(fixture, 16, seed=32)
    resident = engine_for("qwen2moe", "Q4_K_M", kernel_backend="q8").score(ids)
    engine = Engine.from_gguf(fixture.gguf_path, max_cached_experts=3, miss_policy="cpu", kernel_backend="q8")
    assert torch.equal(engine.score(ids), resident)


def test_auto_computes_on_the_cpu_behind_a_very_slow_link():
    fixture = get_fixture("olmoe", "Q4_K_M")
    # 1 MB/s: a copy of one expert takes a good part of a second, the CPU a millisecond
    engine = Engine.from_gguf(fixture.gguf_path, max_cached_experts=4, miss_policy="auto",
                              simulate_link_gbps=0.001, prefetch=False)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    list(engine.generate(sample_token_ids(fixture, 8, seed=33), params))
    s = engine.stats()
    assert s["misses_copied"] == 0 and s["misses_on_cpu"] == s["expert_misses"] > 0


def test_generation_under_auto_equals_resident(engine_for):
    fixture = get_fixture("qwen3moe", "Q4_K_M")
    prompt = sample_token_ids(fixture, 12, seed=34)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = [o.token_id for o in engine_for("qwen3moe", "Q4_K_M").generate(prompt, params)]
    engine = Engine.from_gguf(fixture.gguf_path, max_cached_experts=5, miss_policy="auto",
                              simulate_link_gbps=4.0)
    assert [o.token_id for o in engine.generate(prompt, params)] == want


def test_calibration_measures_this_machine(engine_for):
    engine = engine_for("olmoe", "Q4_K_M")
    store = engine.experts
    rates = measure_rates(store, torch.device("cpu"), lambda x, w: expert_ffn(x, w, "auto"),
                          torch.float32, exact=True)
    values = (rates.h2d_bytes_per_s, rates.cpu_s_per_byte, rates.device_s_per_expert)
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert rates.cpu_s_per_byte_token >= 0
    given = measure_rates(store, torch.device("cpu"), lambda x, w: expert_ffn(x, w, "auto"),
                          torch.float32, exact=True, link_bytes_per_s=3e9)
    assert given.h2d_bytes_per_s == 3e9


def test_simulated_link_is_refused_on_a_gpu_device():
    from moestream.engine.engine_config import EngineConfig
    from moestream.engine.placement import _simulated_link
    from moestream.kernels.errors import MoestreamError

    with pytest.raises(MoestreamError, match="without a GPU"):
        _simulated_link(EngineConfig(simulate_link_gbps=1.0), torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device side needs CUDA")
@pytest.mark.parametrize("policy", ["auto", "copy", "cpu"])
def test_cuda_policies_match_the_cpu_reference(engine_for, policy):
    fixture = get_fixture("qwen2moe", "Q4_K_M")
    ids = sample_token_ids(fixture, 24, seed=35)
    want = engine_for("qwen2moe", "Q4_K_M").score(ids)  # CPU, exact kernels, all resident
    engine = Engine.from_gguf(fixture.gguf_path, device="cuda", vram_budget="1GiB", max_cached_experts=3,
                              miss_policy=policy)
    got = engine.score(ids)
    assert (got - want).norm() / want.norm() < 2e-2  # fp16 activations on the device side
    s = engine.stats()
    assert s["expert_misses"] == s["misses_copied"] + s["misses_on_cpu"] > 0


def test_cpu_side_runs_while_the_device_side_works():
    """The CPU job is started before the device side and runs beside it: with the device side
    held busy for 0.3 s, every CPU job of the step finishes before its device side does."""
    import time

    fixture = get_fixture("olmoe", "Q4_K_M")
    engine = Engine.from_gguf(fixture.gguf_path, max_cached_experts=4, miss_policy="cpu")
    model, spans = engine.model, []
    cpu_experts, device_side = model._cpu_experts, model._device_side

    def timed_cpu(*args):
        start = time.perf_counter()
        out = cpu_experts(*args)
        spans.append(("cpu", start, time.perf_counter()))
        return out

    def busy_device(*args):
        start = time.perf_counter()
        time.sleep(0.3)
        out = device_side(*args)
        spans.append(("device", start, time.perf_counter()))
        return out

    model._cpu_experts, model._device_side = timed_cpu, busy_device
    engine.score(sample_token_ids(fixture, 6, seed=36))
    cpu = [s for s in spans if s[0] == "cpu"]
    device = [s for s in spans if s[0] == "device"]
    assert len(cpu) == len(device) == engine.config.n_layers  # every layer had CPU misses
    for (_, c_start, c_end), (_, d_start, d_end) in zip(cpu, device):
        assert c_start < d_start + 0.3 and c_end < d_end  # inside the device side's busy time
