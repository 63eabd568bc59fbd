"""The one interface the MoE layer sees: where experts live is the source's business."""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from moestream.offload.layout import ExpertWeights


@dataclass(frozen=True)
class LayerPlan:
    """Where one layer step's experts compute: from the source (`load`), or on the CPU from
    host memory (misses not worth a copy, offload/hybrid.py)."""

    device: tuple[int, ...]
    cpu: tuple[tuple[int, ExpertWeights], ...] = ()  # (expert, its host-memory weights)

    @property
    def cpu_ids(self) -> tuple[int, ...]:
        return tuple(e for e, _ in self.cpu)


@runtime_checkable
class ExpertSource(Protocol):
    def plan(self, layer: int, tokens: Mapping[int, int]) -> LayerPlan:
        """Split {expert: tokens routed to it} between `load` and CPU compute."""
        ...

    def record_cpu(self, layer: int, tokens: Mapping[int, int], seconds: float) -> None:
        """Account for CPU-side experts of a plan: {expert: tokens} took `seconds`."""
        ...

    def load(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield each requested expert once, resident ones first; a yielded expert stays valid
        until the generator is resumed."""
        ...

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Start bringing in experts predicted for a coming layer; never blocks on them."""
        ...

    def stats(self) -> dict:
        """Plain counters: totals, `per_layer`, `n_slots`, `slot_bytes`."""
        ...
