import json
import random
import subprocess
import sys
from collections import OrderedDict
from functools import lru_cache

import pytest

from moestream.kernels.errors import MoestreamError
from moestream.offload.cachesim import (
    belady_hits,
    format_table,
    lfu_hits,
    lru_hits,
    main,
    resolve_size,
    reuse_stats,
    simulate,
)
from moestream.offload.trace import RoutingRecorder, RoutingTrace, TraceRow, read_trace

LOGS = [
    "olmoe-1b-7b-0924_layer0",
    "qwen1.5-moe-a2.7b-chat_layer0",
    "qwen1.5-moe-a2.7b-chat_layer12",
]


def random_trace(rng: random.Random, length: int, n_keys: int) -> list[int]:
    """Skewed (Zipf-like) random keys, the shape expert routing has."""
    weights = [1 / (k + 1) for k in range(n_keys)]
    return rng.choices(range(n_keys), weights, k=length)


def optimum_hits(accesses: list[int], size: int) -> int:
    """Brute force over every eviction choice: the most hits any demand-paging cache can get."""
    @lru_cache(maxsize=None)
    def best(t: int, cache: frozenset) -> int:
        if t == len(accesses):
            return 0
        key = accesses[t]
        if key in cache:
            return 1 + best(t + 1, cache)
        if len(cache) < size:
            return best(t + 1, cache | {key})
        return max(best(t + 1, (cache - {victim}) | {key}) for victim in cache)
    return best(0, frozenset())


def reference_lru(accesses: list[int], size: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for key in accesses:
        hits += key in cache
        cache.pop(key, None)
        cache[key] = None
        while len(cache) > size:
            del cache[next(iter(cache))]
    return hits


def reference_lfu(accesses: list[int], size: int) -> int:
    """Linear scan: evict the fewest uses so far, the least recently used among equals."""
    count: dict[int, int] = {}
    last: dict[int, int] = {}
    cache: set[int] = set()
    hits = 0
    for t, key in enumerate(accesses):
        count[key] = count.get(key, 0) + 1
        if key in cache:
            hits += 1
        else:
            if len(cache) == size:
                cache.remove(min(cache, key=lambda k: (count[k], last[k])))
            cache.add(key)
        last[key] = t
    return hits


def test_belady_equals_brute_force_optimum_on_tiny_traces():
    rng = random.Random(11)
    for _ in range(150):
        accesses = random_trace(rng, rng.randint(1, 12), rng.randint(2, 6))
        size = rng.randint(1, 3)
        assert belady_hits(accesses, size) == optimum_hits(accesses, size)


def test_policies_match_independent_references_on_random_traces():
    rng = random.Random(5)
    for _ in range(60):
        accesses = random_trace(rng, rng.randint(50, 600), rng.randint(4, 40))
        size = rng.randint(1, 20)
        lru = lru_hits(accesses, size)
        assert lru == reference_lru(accesses, size)
        assert lfu_hits(accesses, size) == reference_lfu(accesses, size)
        belady = belady_hits(accesses, size)
        assert belady >= lru and belady >= lfu_hits(accesses, size)


@pytest.fixture(scope="module")
def shipped(shared_data):
    return {name: read_trace(shared_data / "routing" / f"{name}.jsonl") for name in LOGS}


def count_after_warmup(path) -> int:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r["type"] == "route"]
    warmup = 0
    while rows[warmup]["topk_ids"] == rows[0]["topk_ids"]:
        warmup += 1
    return len(rows) - warmup


def test_shipped_logs_are_read_without_their_warmup(shipped, shared_data):
    for name, trace in shipped.items():
        assert len(trace.rows) == count_after_warmup(shared_data / "routing" / f"{name}.jsonl")
    olmoe, qwen = shipped[LOGS[0]], shipped[LOGS[1]]
    assert (olmoe.n_experts, olmoe.top_k, olmoe.layers) == (64, 8, (0,))
    assert (qwen.n_experts, qwen.top_k) == (60, 4)  # README: top-4 of 60
    assert qwen.n_keys == 60


def test_shipped_logs_hit_rates(shipped):
    for name, trace in shipped.items():
        results = {(r.policy, r.size): r for r in simulate(trace)}
        accesses = trace.accesses()
        for (policy, size), r in results.items():
            assert r.lookups == len(accesses) == len(trace.rows) * trace.top_k
            if policy == "lru":  # the simulator's LRU against the trivial one, on real data
                assert r.hits == reference_lru(accesses, size)
        for size in {s for _, s in results}:
            belady = results["belady", size].hit_rate
            assert belady >= results["lru", size].hit_rate
            assert belady >= results["lfu", size].hit_rate
        quarter = trace.n_experts // 4
        # the brief's figures: LRU 28-36% at a quarter of the experts (uniform 25%), Belady 58-64%
        assert 0.27 <= results["lru", quarter].hit_rate <= 0.36
        assert 0.58 <= results["belady", quarter].hit_rate <= 0.64


def test_sizes_fractions_and_counts():
    assert [resolve_size(s, 60) for s in (0.125, 0.25, 0.5, 1, 16, 100)] == [7, 15, 30, 1, 16, 60]
    assert resolve_size(0.001, 60) == 1
    with pytest.raises(MoestreamError):
        resolve_size(0, 60)


def test_recorder_round_trip_and_multi_layer_keys(tmp_path):
    path = tmp_path / "routing.jsonl"
    with RoutingRecorder(path, n_experts=4, n_layers=2, top_k=2) as rec:
        # two requests decoding together: per layer, one row per token of the batch
        for pos in range(3):
            for layer in (0, 1):
                rec.record_batch([7, 9], [pos, pos + 10], layer, [[0, 1], [1, 2]],
                                 [[0.6, 0.4], [0.5, 0.5]])
    trace = read_trace(path)
    assert (trace.n_experts, trace.top_k, trace.layers, trace.n_keys) == (4, 2, (0, 1), 8)
    assert len(trace.rows) == 12
    assert trace.accesses()[:8] == [0, 1, 1, 2, 4, 5, 5, 6]  # (layer, expert) -> layer*4+expert
    first_line = json.loads(path.read_text().splitlines()[1])
    assert first_line == {"seq": 7, "pos": 0, "layer": 0, "experts": [0, 1], "weights": [0.6, 0.4]}
    # row 4 is seq 7 pos 1 layer 0; its previous token is row 0
    assert [r.prev for r in trace.rows] == [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5, 6, 7]
    stats = reuse_stats(trace)
    assert stats.same_request == 1.0 and stats.same_request_pairs == 8
    # consecutive rows at a layer alternate between the two requests: {0,1} vs {1,2}
    assert stats.consecutive == 0.5 and stats.consecutive_pairs == 10
    assert stats.uniform == 0.5


def test_vllm_same_request_pairs_only_across_equal_batches(tmp_path):
    path = tmp_path / "vllm.jsonl"
    rows = [[9, 9]] * 3 + [[0, 1], [2, 3]] + [[0, 2], [2, 1]] + [[0, 1]]  # warm-up, passes 2, 2, 1
    idx = [0, 1, 2, 0, 1, 0, 1, 0]
    lines = [{"type": "meta", "top_k": 2, "num_experts": 4}] + [
        {"type": "route", "req_id": "r", "token_idx": t, "layer": 0, "topk_ids": ids,
         "topk_weights": [0.5, 0.5]} for t, ids in zip(idx, rows)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    trace = read_trace(path)
    assert [r.prev for r in trace.rows] == [-1, -1, 0, 1, -1]
    stats = reuse_stats(trace)
    assert stats.same_request == pytest.approx((0.5 + 0.5) / 2)
    assert stats.consecutive == pytest.approx((0 + 0.5 + 0.5 + 0.5) / 4)


def test_main_prints_the_table(shared_data, capsys):
    files = [str(shared_data / "routing" / f"{name}.jsonl") for name in LOGS[1:]]
    assert main([*files, "--sizes", "0.25,8", "--policies", "lru,belady"]) == 0
    out = capsys.readouterr().out
    assert "| qwen1.5-moe-a2.7b-chat_layer12.jsonl | 15 | 25.0% |" in out
    assert "| qwen1.5-moe-a2.7b-chat_layer0.jsonl | 8 | 13.3% |" in out
    assert "LFU" not in out and "same request" in out


def test_module_entry_point_reports_bad_input(tmp_path):
    bad = tmp_path / "empty.jsonl"
    bad.write_text('{"type": "meta"}\n')
    proc = subprocess.run([sys.executable, "-m", "moestream.offload.cachesim", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no routing rows" in proc.stderr


def test_format_table_layout():
    rows = tuple(TraceRow(0, experts, -1) for experts in ((0, 1), (1, 2), (0, 1)))
    results = simulate(RoutingTrace("t", 4, 2, (0,), rows), [1, 2])
    table = format_table(results).splitlines()
    assert table[0] == "| trace | slots | share of experts | LRU | LFU | Belady | uniform |"
    # keys 0 1 1 2 0 1: one slot hits only the repeated 1; with two, LFU keeps the twice-used 1
    # and Belady evicts 1 (needed last) for 2, then hits 0
    assert table[2:] == [
        "| t | 1 | 25.0% | 16.7% | 16.7% | 16.7% | 25.0% |",
        "| t | 2 | 50.0% | 16.7% | 33.3% | 33.3% | 50.0% |",
    ]
