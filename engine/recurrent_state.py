"""Per-sequence recurrent state of the Gated DeltaNet layers, beside the paged KV cache.

A DeltaNet layer keeps, per sequence, the last `conv_kernel - 1` inputs of its short
convolution and a [v_heads, k_dim, v_dim] recurrent state; neither grows with the context.
The pool holds a fixed number of slots (one per sequence that can run at once); a
sequence takes a slot when admitted and gives it back when it finishes, is aborted or is
preempted, so admission pairs `can_allocate` with `allocate` as the KV cache does. A slot
is zeroed when handed out: a (re)started prefill begins from the empty state.
States are fp32 on every device: the recurrence sums thousands of decayed updates.
"""

from __future__ import annotations

import heapq

import torch

from moestream.engine.config import LinearAttnConfig


class RecurrentStatePool:
    def __init__(self, linear: LinearAttnConfig, num_slots: int, device: torch.device | str = "cpu"):
        n_layers = sum(linear.recurrent_layers)
        self.num_slots = num_slots
        # [DeltaNet layer, slot, kernel - 1, channels]: the convolution's input window
        self.conv = torch.zeros(n_layers, num_slots, linear.conv_kernel - 1, linear.conv_channels,
                                dtype=torch.float32, device=device)
        # [DeltaNet layer, slot, v_heads, k_dim, v_dim]
        self.ssm = torch.zeros(n_layers, num_slots, linear.n_v_heads, linear.head_k_dim, linear.head_v_dim,
                               dtype=torch.float32, device=device)
        self.free_slots: list[int] = list(range(num_slots))  # a heap: lowest id first

    @staticmethod
    def bytes_for(linear: LinearAttnConfig, num_slots: int) -> int:
        """What the pool will occupy, for the placement plan before anything is allocated."""
        return linear.state_bytes_per_seq * num_slots

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def can_allocate(self) -> bool:
        return bool(self.free_slots)

    def allocate(self) -> int:
        if not self.free_slots:
            raise RuntimeError("recurrent state pool is full: call can_allocate first")
        slot = heapq.heappop(self.free_slots)
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()
        return slot

    def copy(self, src: int, dst: int) -> None:
        """A forked sequence's state: the parent's after the shared prompt."""
        self.conv[:, dst] = self.conv[:, src]
        self.ssm[:, dst] = self.ssm[:, src]

    def free(self, slot: int | None) -> None:
        """Give a slot back; None (a sequence that holds none) is a no-op."""
        if slot is not None:
            heapq.heappush(self.free_slots, slot)
