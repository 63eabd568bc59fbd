"""Replay routing traces through LRU, LFU and Belady-optimal expert caches.

Every token's top-k experts at a layer are looked up one after another (the cache key is the
expert id for single-layer logs, (layer, expert) for multi-layer traces), which is what a
batch-1 decode asks of ExpertCache. Hit rate = hits / lookups. Uniform random routing would
hit size / n_keys under any policy that cannot see the future: the baseline column.

    python -m offload.cachesim FILE... [--sizes 0.125,0.25,0.5] [--policies lru,lfu,belady]
"""

import argparse
import heapq
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moestream.kernels.errors import MoestreamError
from moestream.offload.trace import RoutingTrace, read_trace

DEFAULT_SIZES = (0.125, 0.25, 0.5)
POLICIES = ("lru", "lfu", "belady")
_TITLES = {"lru": "LRU", "lfu": "LFU", "belady": "Belady"}


@dataclass(frozen=True)
class SimResult:
    trace: str
    policy: str
    size: int  # cache slots
    n_keys: int  # distinct (layer, expert) keys the trace could ask for
    lookups: int
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups

    @property
    def uniform_rate(self) -> float:
        return self.size / self.n_keys


def lru_hits(accesses: Sequence[int], size: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for key in accesses:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
            continue
        if len(cache) >= size:
            cache.popitem(last=False)
        cache[key] = None
    return hits


def lfu_hits(accesses: Sequence[int], size: int) -> int:
    """Perfect LFU: counts persist across evictions (popularity over the whole history);
    ties go to the least recently used. Heap entries go stale and are skipped on pop."""
    count: dict[int, int] = {}
    cache: dict[int, tuple[int, int]] = {}  # key -> (count, last use) of its live heap entry
    heap: list[tuple[int, int, int]] = []
    hits = 0
    for t, key in enumerate(accesses):
        count[key] = count.get(key, 0) + 1
        if key in cache:
            hits += 1
        elif len(cache) >= size:
            _pop_valid(heap, cache)
        cache[key] = (count[key], t)
        heapq.heappush(heap, (count[key], t, key))
    return hits


def belady_hits(accesses: Sequence[int], size: int) -> int:
    """Belady's MIN: on a miss evict the cached key whose next use is furthest away."""
    never = len(accesses)
    next_use = [never] * len(accesses)
    seen: dict[int, int] = {}
    for t in range(len(accesses) - 1, -1, -1):
        next_use[t] = seen.get(accesses[t], never)
        seen[accesses[t]] = t
    cache: dict[int, tuple[int]] = {}  # key -> (-next use,) of its live heap entry
    heap: list[tuple[int, int]] = []
    hits = 0
    for t, key in enumerate(accesses):
        if key in cache:
            hits += 1
        elif len(cache) >= size:
            _pop_valid(heap, cache)
        cache[key] = (-next_use[t],)
        heapq.heappush(heap, (-next_use[t], key))
    return hits


def _pop_valid(heap: list[tuple], cache: dict[int, tuple]) -> None:
    """Evict the heap's smallest entry that is still the live entry of a cached key."""
    while True:
        *priority, key = heapq.heappop(heap)
        if cache.get(key) == tuple(priority):
            del cache[key]
            return


_POLICY_HITS: dict[str, Callable[[Sequence[int], int], int]] = {
    "lru": lru_hits, "lfu": lfu_hits, "belady": belady_hits,
}


def resolve_size(size: float, n_keys: int) -> int:
    """A size below 1 is a fraction of all keys (rounded down, at least 1); else a slot count."""
    if size <= 0:
        raise MoestreamError(f"cache size {size} must be positive (a fraction < 1 or a slot count)")
    return max(1, int(size * n_keys)) if size < 1 else min(int(size), n_keys)


def simulate(trace: RoutingTrace, sizes: Sequence[float] = DEFAULT_SIZES,
             policies: Sequence[str] = POLICIES) -> list[SimResult]:
    unknown = set(policies) - set(_POLICY_HITS)
    if unknown:
        raise MoestreamError(f"unknown cache policies {sorted(unknown)}: choose from {POLICIES}")
    accesses = trace.accesses()
    return [
        SimResult(trace.name, policy, slots, trace.n_keys, len(accesses),
                  _POLICY_HITS[policy](accesses, slots))
        for slots in (resolve_size(s, trace.n_keys) for s in sizes)
        for policy in policies
    ]


@dataclass(frozen=True)
class ReuseStats:
    """How much of a token's expert set the token before it already used (same layer).

    consecutive: the previous row in trace order at the same layer (in vLLM prefill passes
    that is the previous prompt token; in decode passes, the neighbouring request).
    same_request: the same request's previous token (moestream traces: exact; vLLM logs: same
    batch row in the previous decode step of an unchanged batch, see trace._same_slot_prev).
    Each is the mean of |E_t & E_prev| / |E_t|; uniform routing would give top_k / n_experts.
    """

    trace: str
    rows: int
    consecutive: float
    consecutive_pairs: int
    same_request: float | None
    same_request_pairs: int
    uniform: float


def reuse_stats(trace: RoutingTrace) -> ReuseStats:
    last_at_layer: dict[int, int] = {}
    consecutive: list[float] = []
    same_request: list[float] = []
    for i, row in enumerate(trace.rows):
        if row.layer in last_at_layer:
            consecutive.append(_overlap(row.experts, trace.rows[last_at_layer[row.layer]].experts))
        if row.prev >= 0:
            same_request.append(_overlap(row.experts, trace.rows[row.prev].experts))
        last_at_layer[row.layer] = i
    return ReuseStats(
        trace.name, len(trace.rows), _mean(consecutive) or 0.0, len(consecutive),
        _mean(same_request), len(same_request), trace.top_k / trace.n_experts,
    )


def _overlap(now: Sequence[int], before: Sequence[int]) -> float:
    return len(set(now) & set(before)) / len(now)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def format_table(results: Sequence[SimResult]) -> str:
    """Markdown: one row per (trace, size), one hit-rate column per policy."""
    policies = list(dict.fromkeys(r.policy for r in results))
    by_row: dict[tuple[str, int], dict[str, SimResult]] = {}
    for r in results:
        by_row.setdefault((r.trace, r.size), {})[r.policy] = r
    titles = " | ".join(_TITLES[p] for p in policies)
    lines = [
        f"| trace | slots | share of experts | {titles} | uniform |",
        "|---|---:|---:|" + "---:|" * (len(policies) + 1),
    ]
    for (name, size), row in by_row.items():
        any_result = next(iter(row.values()))
        rates = " | ".join(f"{100 * row[p].hit_rate:.1f}%" for p in policies)
        lines.append(f"| {name} | {size} | {100 * size / any_result.n_keys:.1f}% | {rates} | "
                     f"{100 * any_result.uniform_rate:.1f}% |")
    return "\n".join(lines)


def format_reuse(stats: Sequence[ReuseStats]) -> str:
    lines = [
        "| trace | rows | consecutive rows | same request | uniform |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in stats:
        same = "n/a" if s.same_request is None else \
            f"{100 * s.same_request:.1f}% ({s.same_request_pairs} pairs)"
        lines.append(f"| {s.trace} | {s.rows} | {100 * s.consecutive:.1f}% | {same} | "
                     f"{100 * s.uniform:.1f}% |")
    return "\n".join(lines)


def _parse_sizes(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise MoestreamError(f"--sizes {text!r}: give comma-separated fractions of the experts "
                             f"(0.125,0.25) or slot counts (8,16)") from err


def add_cache_sim_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+",
                        help="routing traces (moestream --record-routing, or vLLM logs)")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="cache sizes: fractions of all experts (<1) or slot counts "
                             "(default %(default)s)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="default %(default)s")


def cache_sim_main(args: argparse.Namespace) -> int:
    sizes = _parse_sizes(args.sizes)
    policies = [p.strip().lower() for p in args.policies.split(",") if p.strip()]
    traces = [read_trace(path) for path in args.files]
    results = [r for trace in traces for r in simulate(trace, sizes, policies)]
    print("Hit rate per cache size (lookups replayed one token at a time)\n")
    print(format_table(results))
    print("\nExpert reuse between a token and the one before it\n")
    print(format_reuse([reuse_stats(trace) for trace in traces]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moestream cache-sim",
                                     description=__doc__.splitlines()[0])
    add_cache_sim_args(parser)
    return cache_sim_main(parser.parse_args(argv))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoestreamError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
