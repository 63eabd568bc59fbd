"""The hybrid miss policy: the cost model's split, the cache's plans under each policy, and
the simulated host->device link."""

import itertools
import random
import time

import pytest
import torch

from moestream.kernels.errors import MoestreamError
from moestream.offload import ExpertCache, HostExpertStore
from moestream.offload.copier import LinkCopier
from moestream.offload.hybrid import MissPolicy, Rates, split_misses
from tests.offload.tiny_store import N_EXPERTS, expected_bytes, make_layers

MB = 1_000_000


def makespan(copied: set[int], misses: dict[int, int], nbytes: int, rates: Rates, n_hits: int) -> float:
    """Finish time of a step, written out independently of split_misses: the device side
    computes hits and copied experts after the link brings the copies in; the CPU side
    computes the rest one after another."""
    device = (n_hits + len(copied)) * rates.device_s_per_expert + len(copied) * nbytes / rates.h2d_bytes_per_s
    cpu = sum(nbytes * (rates.cpu_s_per_byte + rates.cpu_s_per_byte_token * (n - 1))
              for e, n in misses.items() if e not in copied)
    return max(device, cpu)


def test_cheap_link_copies_everything_up_to_the_free_slots():
    rates = Rates(h2d_bytes_per_s=1e12, cpu_s_per_byte=1e-9, cpu_s_per_byte_token=1e-10, device_s_per_expert=0)
    misses = {e: 1 for e in range(6)}
    assert split_misses(misses, MB, rates, n_hits=0, free_slots=10, p_reuse=0).copy == tuple(range(6))
    split = split_misses(misses, MB, rates, n_hits=0, free_slots=4, p_reuse=0)
    assert len(split.copy) == 4 and len(split.cpu) == 2
    assert sorted(split.copy + split.cpu) == list(range(6))


def test_slow_link_computes_everything_on_the_cpu():
    rates = Rates(h2d_bytes_per_s=1e6, cpu_s_per_byte=1e-10, cpu_s_per_byte_token=1e-11, device_s_per_expert=0)
    split = split_misses({3: 1, 5: 2, 7: 1}, MB, rates, n_hits=2, free_slots=10, p_reuse=0.5)
    assert split.copy == () and sorted(split.cpu) == [3, 5, 7]


def test_equal_costs_split_the_misses_evenly():
    # a copy and a CPU computation of one token cost the same: two and two is the optimum
    rates = Rates(h2d_bytes_per_s=1e9, cpu_s_per_byte=1e-9, cpu_s_per_byte_token=1e-9, device_s_per_expert=0)
    misses = {e: 1 for e in range(4)}
    split = split_misses(misses, MB, rates, n_hits=0, free_slots=10, p_reuse=0)
    assert len(split.copy) == 2 and len(split.cpu) == 2
    best = min(makespan({e for e, c in zip(misses, bits) if c}, misses, MB, rates, 0)
               for bits in itertools.product([0, 1], repeat=4))
    assert makespan(set(split.copy), misses, MB, rates, 0) == pytest.approx(best)


def test_many_tokens_go_to_the_device():
    # the CPU's cost grows with the tokens routed to an expert, a copy's does not
    rates = Rates(h2d_bytes_per_s=1e9, cpu_s_per_byte=1e-9, cpu_s_per_byte_token=1e-9, device_s_per_expert=0)
    split = split_misses({0: 1, 1: 64, 2: 1}, MB, rates, n_hits=0, free_slots=10, p_reuse=0)
    assert 1 in split.copy


def test_reuse_tips_a_tie_towards_the_copy():
    rates = Rates(h2d_bytes_per_s=1e9, cpu_s_per_byte=0.9e-9, cpu_s_per_byte_token=0, device_s_per_expert=0)
    assert split_misses({0: 1}, MB, rates, n_hits=0, free_slots=1, p_reuse=0).cpu == (0,)
    assert split_misses({0: 1}, MB, rates, n_hits=0, free_slots=1, p_reuse=0.9).copy == (0,)


def test_never_slower_than_always_copy_or_always_cpu():
    rng = random.Random(0)
    for _ in range(500):
        rates = Rates(h2d_bytes_per_s=rng.uniform(5e8, 5e10), cpu_s_per_byte=1 / rng.uniform(5e8, 5e10),
                      cpu_s_per_byte_token=1 / rng.uniform(1e9, 1e11), device_s_per_expert=rng.uniform(0, 1e-4))
        misses = {e: rng.choice([1, 1, 1, 2, 3, 8, 30]) for e in range(rng.randint(1, 9))}
        n_hits = rng.randint(0, 8)
        split = split_misses(misses, MB, rates, n_hits=n_hits, free_slots=100, p_reuse=0)
        assert sorted(split.copy + split.cpu) == sorted(misses)
        ours = makespan(set(split.copy), misses, MB, rates, n_hits)
        assert ours <= makespan(set(misses), misses, MB, rates, n_hits) * (1 + 1e-12)
        assert ours <= makespan(set(), misses, MB, rates, n_hits) * (1 + 1e-12)


def test_queued_prefetches_delay_the_link():
    rates = Rates(h2d_bytes_per_s=1e9, cpu_s_per_byte=1e-9, cpu_s_per_byte_token=0, device_s_per_expert=0)
    assert split_misses({0: 1}, MB, rates, n_hits=0, free_slots=1, p_reuse=0.2).copy == (0,)
    busy = split_misses({0: 1}, MB, rates, n_hits=0, free_slots=1, p_reuse=0.2, link_busy_s=0.01)
    assert busy.cpu == (0,)


def test_unknown_policy_names_the_choices():
    with pytest.raises(MoestreamError, match="auto, copy, cpu"):
        MissPolicy.parse("sometimes")


# -- the cache under each policy -------------------------------------------------------------
@pytest.fixture
def store():
    return HostExpertStore(make_layers(), pinned=False)


def test_copy_policy_plans_everything_on_the_device(store):
    cache = ExpertCache(store, 3, "cpu", MissPolicy.COPY)
    plan = cache.plan(1, {0: 2, 4: 1})
    assert plan.device == (0, 4) and plan.cpu == ()


def test_cpu_policy_keeps_the_last_layers_and_never_copies(store):
    cache = ExpertCache(store, N_EXPERTS + 2, "cpu", MissPolicy.CPU)
    # slots hold all of layer 3 (the last), then experts 0 and 1 of layer 1
    assert set(cache.cached()) == {(3, e) for e in range(N_EXPERTS)} | {(1, 0), (1, 1)}
    plan = cache.plan(1, {1: 1, 2: 3, 5: 1})
    assert plan.device == (1,) and plan.cpu_ids == (2, 5)
    for (e, w), want in zip(plan.cpu, (2, 5)):  # host views of the right experts
        got = b"".join(bytes(p.numpy()) for p in w.parts)
        assert e == want and got == expected_bytes(make_layers(), 1, e)
    list(cache.load(1, plan.device))
    cache.prefetch(1, [3, 4])  # the fixed set is never disturbed
    s = cache.stats()
    fill = N_EXPERTS * store.layout(3).expert_bytes + 2 * store.layout(1).expert_bytes  # the start-up fill only
    assert s["bytes_to_device"] == fill and s["expert_evictions"] == 0 and s["prefetch_issued"] == 0
    assert (s["expert_lookups"], s["expert_hits"], s["expert_misses"], s["misses_on_cpu"]) == (3, 1, 2, 2)


def test_auto_policy_counts_both_kinds_of_miss(store):
    # copies cost as much as the CPU: with nothing cached, two misses split one and one
    rates = Rates(h2d_bytes_per_s=1e9, cpu_s_per_byte=1e-9, cpu_s_per_byte_token=0, device_s_per_expert=0)
    cache = ExpertCache(store, 4, "cpu", MissPolicy.AUTO, rates)
    assert set(cache.cached()) == {(3, e) for e in range(4)}  # starts warm, last layer first
    cache._hit_rate.value = 0.0  # no reuse credit: a pure makespan split
    plan = cache.plan(1, {0: 1, 1: 1})
    assert len(plan.device) == 1 and len(plan.cpu) == 1
    list(cache.load(1, plan.device))
    took = 2 * store.layout(1).expert_bytes * 1e-9  # twice what the model predicts
    cache.record_cpu(1, {e: 1 for e in plan.cpu_ids}, took)
    s = cache.stats()
    assert s["misses_copied"] == 1 and s["misses_on_cpu"] == 1 and s["expert_misses"] == 2
    assert s["expert_lookups"] == 2 and s["cpu_compute_s"] == pytest.approx(took)
    assert s["miss_policy"] == "auto"
    assert 1e-9 < rates.cpu_s_per_byte < 2e-9  # the model moves toward what the CPU took


def test_auto_policy_needs_rates(store):
    with pytest.raises(ValueError, match="rates"):
        ExpertCache(store, 2, "cpu", MissPolicy.AUTO)


# -- the simulated link ---------------------------------------------------------------------
def test_link_copier_delivers_the_bytes_no_sooner_than_the_link_allows(store):
    rate = 200e6  # bytes per second
    link = LinkCopier(rate)
    cache = ExpertCache(store, 2, "cpu", MissPolicy.COPY, copier=link)
    layout = store.layout(1)
    start = time.perf_counter()
    got = {e: b"".join(bytes(p.numpy()) for p in w.parts) for e, w in cache.load(1, [0, 1, 2])}
    elapsed = time.perf_counter() - start
    layers = make_layers()
    assert got == {e: expected_bytes(layers, 1, e) for e in (0, 1, 2)}
    # three copies, the third into a slot freed by the first: the link carried 3 experts
    assert elapsed >= 3 * layout.expert_bytes / rate
    s = cache.stats()
    assert s["stall_s"] > 0
    # copy_s is time on the link (not the moment it took to queue the copies)
    assert s["copy_s"] >= 0.9 * 3 * layout.expert_bytes / rate


def test_link_copier_keeps_copies_to_one_slot_in_order():
    link = LinkCopier(1e9)
    dst = torch.zeros(4, dtype=torch.uint8)
    link.copy(0, dst, [torch.full((4,), 1, dtype=torch.uint8)], layer=0)
    link.copy(0, dst, [torch.full((4,), 2, dtype=torch.uint8)], layer=0)
    link.wait(0, layer=0)
    assert dst.tolist() == [2, 2, 2, 2]
