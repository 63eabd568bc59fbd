"""Plain counters of an expert source, overall and per layer (server/ turns them into metrics)."""

from collections import defaultdict
from dataclasses import asdict, dataclass, fields


@dataclass
class CacheCounters:
    """Counts for one layer; expert_hits + expert_misses == expert_lookups and
    misses_copied + misses_on_cpu == expert_misses always."""

    expert_lookups: int = 0
    expert_hits: int = 0
    expert_misses: int = 0
    misses_copied: int = 0  # misses copied into a slot and computed on the device
    misses_on_cpu: int = 0  # misses computed on the CPU from host memory, no copy
    expert_evictions: int = 0
    bytes_to_device: int = 0
    copy_s: float = 0.0  # time the host->device link spent on expert copies (finished ones)
    stall_s: float = 0.0  # time compute waited for copies
    prefetch_issued: int = 0
    prefetch_used: int = 0
    cpu_compute_s: float = 0.0  # wall time of the CPU side's expert computations


class CacheStats:
    """Per-layer CacheCounters; totals are sums, computed when asked so they never drift."""

    def __init__(self) -> None:
        self._per_layer: defaultdict[int, CacheCounters] = defaultdict(CacheCounters)

    def add(self, layer: int, **amounts: float) -> None:
        counters = self._per_layer[layer]
        for name, amount in amounts.items():
            setattr(counters, name, getattr(counters, name) + amount)

    def as_dict(self, **extra: int) -> dict:
        """Totals under the counter names, `per_layer` {layer: {...}}, then `extra` items."""
        totals = CacheCounters()
        for counters in self._per_layer.values():
            for f in fields(CacheCounters):
                setattr(totals, f.name, getattr(totals, f.name) + getattr(counters, f.name))
        per_layer = {layer: asdict(c) for layer, c in sorted(self._per_layer.items())}
        return {**asdict(totals), "per_layer": per_layer, **extra}
