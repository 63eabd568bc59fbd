"""Routing replayed from a real log in place of the router's choice, for benchmarks.

A random-weight model (`moestream synth`) routes with far more locality than a trained one
(an LRU cache of a quarter of the experts hits ~95% of lookups on the synthetic OLMoE file,
against 28-36% on the real logs in shared/data), so offload figures measured on it would be
flattering. Replaying a real log gives the expert cache the locality of real traffic while
every byte still moves and every expert still computes.

Each MoE layer reads its own stream of the log's rows, starting `len(rows) / n_layers` rows
after the previous layer's, so layers do not route identically; a layer's stream advances by
the tokens of each step and wraps around. Weights are uniform (1/k): the numbers a replayed
model prints mean nothing, only its speed and cache behaviour do. Next-layer prefetch predicts
from hidden states, which a replay ignores, so the engine turns prefetch off while replaying.
"""

from __future__ import annotations

import torch

from moestream.kernels.errors import MoestreamError
from moestream.offload.trace import RoutingTrace


class RoutingReplay:
    def __init__(self, trace: RoutingTrace, n_experts: int, top_k: int, n_layers: int):
        if trace.n_experts != n_experts or trace.top_k != top_k:
            raise MoestreamError(
                f"routing log {trace.name} routes top-{trace.top_k} of {trace.n_experts} experts but "
                f"the model routes top-{top_k} of {n_experts}: replay a log of the same model family")
        rows = [r.experts for r in trace.rows if len(r.experts) == top_k]
        if not rows:
            raise MoestreamError(f"routing log {trace.name} has no rows of {top_k} experts")
        self._rows = torch.tensor(rows, dtype=torch.long)  # [R, k]
        stride = max(1, len(rows) // n_layers)
        self._cursor = [layer * stride for layer in range(n_layers)]
        self.top_k = top_k

    def route(self, layer: int, n_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `n_tokens` rows of this layer's stream: ids [T, k] and uniform weights."""
        start = self._cursor[layer]
        index = torch.arange(start, start + n_tokens) % len(self._rows)
        self._cursor[layer] = (start + n_tokens) % len(self._rows)
        ids = self._rows[index].to(device)
        return ids, torch.full(ids.shape, 1.0 / self.top_k, device=device)
