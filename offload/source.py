"""The one interface the MoE layer sees: where experts live is the source's business."""

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from offload.layout import ExpertWeights


@runtime_checkable
class ExpertSource(Protocol):
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
