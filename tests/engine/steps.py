"""Driving a model's forward by hand, as the scheduler would: one sequence's tokens fed
as one step, for tests that compare chunked prefill and decode with one pass."""

from __future__ import annotations

import torch

from moestream.engine.model import BatchInput, Segment


def step_logits(engine, ids: list[int], start: int, table: list[int], state_slot: int | None = None) -> torch.Tensor:
    """Feed ids[start:] of one sequence (KV blocks in `table`, grown as needed; hybrid
    models: its recurrent state slot) as one step; the logits of its last token."""
    kv, end = engine.kv, len(ids)
    kv.allocate(table, end)
    segment = Segment(0, end - start, kv.index(table, start, end), kv.index(table, 0, end), state_slot)
    batch = BatchInput(torch.tensor(ids[start:]), torch.arange(start, end), [segment],
                       torch.tensor([end - start - 1]))
    return engine.model.forward(batch, kv)[0]
