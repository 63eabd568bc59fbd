import random
from collections import OrderedDict

import pytest
import torch

from moestream.offload import ExpertCache, ExpertSource, HostExpertStore
from tests.offload.tiny_store import D, F, LAYER_TYPES, N_EXPERTS, expected_bytes, part_bytes


def consume(cache: ExpertCache, layer: int, ids: list[int]) -> dict[int, bytes]:
    """Run one load to the end; bytes of each expert are read while it is valid."""
    got: dict[int, bytes] = {}
    for expert, w in cache.load(layer, ids):
        assert expert not in got, "an expert was yielded twice"
        got[expert] = b"".join(part.cpu().numpy().tobytes() for part in w.parts)
    return got


def copied_bytes(store: HostExpertStore, stats: dict) -> int:
    """Bytes the misses of `stats` must have copied."""
    return sum(store.layout(layer).expert_bytes * counters["expert_misses"]
               for layer, counters in stats["per_layer"].items())


def test_slot_buffer_is_n_slots_times_largest_expert(store):
    cache = ExpertCache(store, 4, "cpu")
    largest = max(part_bytes(g, F, D) + part_bytes(u, F, D) + part_bytes(d, D, F)
                  for g, u, d in LAYER_TYPES.values())
    assert cache.slot_bytes == largest
    assert cache.buffer.dtype == torch.uint8 and cache.buffer.numel() == 4 * largest
    assert (cache.stats()["n_slots"], cache.stats()["slot_bytes"]) == (4, largest)
    assert isinstance(cache, ExpertSource)


def test_lru_order_and_eviction(store):
    cache = ExpertCache(store, 3, "cpu")
    consume(cache, 1, [0, 1, 2])
    consume(cache, 1, [0])  # hit: (1, 0) becomes most recent
    consume(cache, 3, [5])  # miss with every slot full: evicts (1, 1), least recently used
    assert cache.cached() == [(1, 2), (1, 0), (3, 5)]
    stats = cache.stats()
    assert (stats["expert_hits"], stats["expert_misses"], stats["expert_evictions"]) == (1, 4, 1)
    assert stats["per_layer"][1]["expert_evictions"] == 1  # counted on the evicted key's layer
    assert stats["per_layer"][3]["expert_misses"] == 1


def test_lru_matches_a_reference_under_pressure(layers, store):
    rng = random.Random(7)
    n_slots = 4
    cache = ExpertCache(store, n_slots, "cpu")
    reference: OrderedDict[tuple[int, int], None] = OrderedDict()
    hits = misses = evictions = lookups = 0
    for _ in range(150):
        layer = rng.choice(store.layers)
        ids = rng.sample(range(N_EXPERTS), rng.randint(1, n_slots))
        got = consume(cache, layer, ids)
        assert got == {e: expected_bytes(layers, layer, e) for e in ids}
        lookups += len(ids)
        # reference: hits are touched first, then misses inserted, evicting least recent
        for e in [e for e in ids if (layer, e) in reference]:
            reference.move_to_end((layer, e))
            hits += 1
        for e in [e for e in ids if (layer, e) not in reference]:
            if len(reference) == n_slots:
                reference.popitem(last=False)
                evictions += 1
            reference[(layer, e)] = None
            misses += 1
        assert cache.cached() == list(reference)
    stats = cache.stats()
    assert stats["expert_lookups"] == lookups == stats["expert_hits"] + stats["expert_misses"]
    assert (stats["expert_hits"], stats["expert_misses"], stats["expert_evictions"]) == \
        (hits, misses, evictions)
    assert stats["bytes_to_device"] == copied_bytes(store, stats)


def test_more_experts_than_slots_stream_in_waves(layers, store):
    cache = ExpertCache(store, 2, "cpu")
    consume(cache, 1, [4])
    order = []
    for expert, w in cache.load(1, [3, 0, 4, 5, 1, 2]):
        order.append(expert)
        blob = cache.buffer.view(-1)
        assert blob.data_ptr() <= w.gate.data_ptr() < blob.data_ptr() + blob.numel()
        got = b"".join(part.numpy().tobytes() for part in w.parts)
        assert got == expected_bytes(layers, 1, expert)
    assert order[0] == 4  # the hit computes first
    assert sorted(order) == list(range(N_EXPERTS))
    stats = cache.stats()
    assert (stats["expert_hits"], stats["expert_misses"]) == (1, 6)
    assert stats["expert_evictions"] == 6 - 2  # every fill beyond the two slots evicts


def test_prefetch_then_load_counts_used_prefetches(layers, store):
    cache = ExpertCache(store, 4, "cpu")
    cache.prefetch(3, [2, 5])
    got = consume(cache, 3, [5, 1, 2])
    assert got == {e: expected_bytes(layers, 3, e) for e in (5, 1, 2)}
    stats = cache.stats()
    assert (stats["prefetch_issued"], stats["prefetch_used"]) == (2, 2)
    assert (stats["expert_hits"], stats["expert_misses"]) == (2, 1)
    consume(cache, 3, [5])  # a second hit on a prefetched slot is an ordinary hit
    assert cache.stats()["prefetch_used"] == 2


def test_prefetch_never_evicts_slots_of_the_active_load(layers, store):
    cache = ExpertCache(store, 3, "cpu")
    got = {}
    for expert, w in cache.load(1, [0, 1, 2]):
        if not got:  # first yield: it and the two copies behind it hold all three slots
            cache.prefetch(3, [0, 1, 2])
            assert cache.stats()["prefetch_issued"] == 0
        got[expert] = b"".join(part.numpy().tobytes() for part in w.parts)
    assert got == {e: expected_bytes(layers, 1, e) for e in range(3)}
    cache.prefetch(3, [0, 1, 2, 3])  # released now: three fit, the prefetch keeps its own
    assert cache.cached() == [(3, 0), (3, 1), (3, 2)]
    assert cache.stats()["prefetch_issued"] == 3


def test_closing_a_load_early_releases_its_slots(layers, store):
    cache = ExpertCache(store, 2, "cpu")
    load = cache.load(1, [0, 1, 2, 3])
    next(load)
    load.close()
    assert consume(cache, 3, [4, 5]) == {e: expected_bytes(layers, 3, e) for e in (4, 5)}


def test_one_load_at_a_time(store):
    cache = ExpertCache(store, 2, "cpu")
    first = cache.load(1, [0])
    next(first)
    with pytest.raises(RuntimeError, match="previous load"):
        next(cache.load(1, [1]))


def test_cache_copies_whole_blobs_from_a_pinned_store(layers, fake_pinning):
    store = HostExpertStore(layers, pinned=True, progress=False)
    cache = ExpertCache(store, 3, "cpu")
    for layer, ids in ((1, [5, 0, 3]), (3, [1, 2]), (1, [0, 4])):
        assert consume(cache, layer, ids) == {e: expected_bytes(layers, layer, e) for e in ids}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="copy stream and events need CUDA")
def test_cuda_copies_and_compute_are_ordered(layers):
    """Slow 'compute' (a GPU sleep, then a device-side snapshot of the slot) races the copy
    stream: without the copy-done wait it snapshots a half-copied slot, without the
    last-use wait the next copy overwrites the slot before the snapshot reads it."""
    store = HostExpertStore(layers, pinned=True, progress=False)
    cache = ExpertCache(store, 2, "cuda")
    cache.prefetch(3, [1, 2])
    snapshots = []
    for layer, ids in ((3, [1, 2, 0]), (1, [0, 1, 2, 3, 4, 5]), (3, [2])):
        for expert, w in cache.load(layer, ids):
            torch.cuda._sleep(2_000_000)
            snapshots.append((layer, expert, torch.cat(w.parts).clone()))
    torch.cuda.synchronize()
    for layer, expert, snapshot in snapshots:
        assert snapshot.cpu().numpy().tobytes() == expected_bytes(layers, layer, expert)
    stats = cache.stats()
    assert stats["prefetch_used"] == 2 and stats["stall_s"] >= 0
    prefetched = 2 * store.layout(3).expert_bytes
    assert stats["bytes_to_device"] == copied_bytes(store, stats) + prefetched


def consume_groups(cache: ExpertCache, layer: int, ids: list[int]) -> list[dict[int, bytes]]:
    """Run one grouped load to the end; each group's slot bytes are read while it is valid."""
    groups = []
    for group in cache.load_groups(layer, ids):
        slots = [slot for _, slot in group]
        assert len(set(slots)) == len(slots), "two experts of one group share a slot"
        groups.append({e: cache.buffer[slot, :cache.store.layout(layer).expert_bytes].numpy().tobytes()
                       for e, slot in group})
    return groups


def test_grouped_loads_hand_out_hits_first_then_waves(layers, store):
    cache = ExpertCache(store, 3, "cpu")
    consume(cache, 1, [4, 5])
    # two hits, then four misses through 3 slots: one copies while the hits are locked;
    # while that wave computes, the next copies into the two slots the hits freed; then the last
    groups = consume_groups(cache, 1, [0, 4, 1, 5, 2, 3])
    assert [sorted(g) for g in groups] == [[4, 5], [0], [1, 2], [3]]
    for group in groups:
        assert group == {e: expected_bytes(layers, 1, e) for e in group}
    stats = cache.stats()
    assert (stats["expert_hits"], stats["expert_misses"], stats["misses_copied"]) == (2, 6, 6)


def test_grouped_loads_match_per_expert_loads_under_pressure(layers, store):
    rng = random.Random(11)
    grouped, single = ExpertCache(store, 4, "cpu"), ExpertCache(store, 4, "cpu")
    for _ in range(60):
        layer = rng.choice(store.layers)
        ids = rng.sample(range(N_EXPERTS), rng.randint(1, N_EXPERTS))
        merged = {e: b for g in consume_groups(grouped, layer, ids) for e, b in g.items()}
        assert merged == consume(single, layer, ids) == {e: expected_bytes(layers, layer, e) for e in ids}
    assert grouped.cached() == single.cached()  # same LRU order either way


def test_shrink_frees_the_buffer_and_the_smaller_cache_still_serves_exact_bytes(store, layers):
    """A measurement over budget shrinks the cache between steps: the buffer holds the new
    slot count, lookups miss and copy again, and every expert still reads its own bytes."""
    cache = ExpertCache(store, 6, "cpu")
    consume(cache, 1, [0, 1, 2])
    cache.shrink(2)
    assert cache.n_slots == 2 and cache.buffer.shape == (2, cache.slot_bytes) and cache.cached() == []
    for layer, ids in ((1, [0, 1, 2, 3]), (3, [5, 1])):
        got = consume(cache, layer, ids)
        assert got == {e: expected_bytes(layers, layer, e) for e in ids}
    assert cache.stats()["n_slots"] == 2
    with pytest.raises(ValueError):
        cache.shrink(3)


def test_shrink_refills_the_fixed_set_of_the_cpu_policy(store):
    cache = ExpertCache(store, 6, "cpu", policy="cpu")
    cache.shrink(2)
    last = max(store.layers)
    assert cache.cached() == [(last, 0), (last, 1)]
