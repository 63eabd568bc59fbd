"""The engine through a tiny expert cache gives exactly the all-resident results."""

import pytest
import torch

from moestream.engine import SamplingParams
from tests.fixtures.models import ARCHS, get_fixture, sample_token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_two_slots_per_layer_is_bitwise_identical_to_resident(engine_for, arch):
    fixture = get_fixture(arch, "Q4_K_M")
    ids = sample_token_ids(fixture, 24, seed=21)
    resident = engine_for(arch, "Q4_K_M").score(ids)
    n_layers = engine_for(arch, "Q4_K_M").config.n_layers
    for slots, prefetch in ((n_layers, False), (2 * n_layers, True), (1, True)):
        cached = engine_for(arch, "Q4_K_M", vram_budget="1GiB", max_cached_experts=slots, prefetch=prefetch)
        assert torch.equal(cached.score(ids), resident)
        stats = cached.stats()
        assert stats["n_slots"] == slots
        assert stats["expert_misses"] > 0 and stats["bytes_to_device"] > 0


def test_counters_add_up_and_prefetch_is_counted(engine_for):
    engine = engine_for("olmoe", "Q8_0", vram_budget="1GiB", max_cached_experts=6, prefetch=True)
    fixture = get_fixture("olmoe", "Q8_0")
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    list(engine.generate(sample_token_ids(fixture, 5, seed=22), params))
    s = engine.stats()
    per_layer = s["per_layer"]
    assert s["expert_hits"] + s["expert_misses"] == sum(v["expert_hits"] + v["expert_misses"]
                                                        for v in per_layer.values())
    assert s["expert_hits"] > 0 and s["prefetch_issued"] > 0
    assert 0 <= s["prefetch_used"] <= s["prefetch_issued"]


def test_budget_bounds_the_cache(engine_for):
    engine = engine_for("qwen2moe", "Q4_K_M", vram_budget="20MiB")
    plan = engine.plan
    used = plan.resident_bytes + plan.kv_bytes + plan.workspace_bytes + plan.n_slots * plan.slot_bytes
    assert used <= plan.budget_bytes
    assert engine.stats()["n_slots"] == plan.n_slots
    assert engine.experts.buffer.nbytes == plan.n_slots * plan.slot_bytes
