"""Where one expert's projections sit inside an expert-cache slot.

A slot is one row of a uint8 buffer [n_slots, slot_bytes] holding the raw GGUF bytes of one
expert's gate, up and down projections (copied without repacking), each at a byte offset.
"""

from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q

from moestream.kernels.formats import row_bytes


@dataclass(frozen=True)
class SlotTensor:
    """One projection W [rows, cols] (y = x @ W^T) stored at `offset_bytes` within a slot."""

    offset_bytes: int
    qtype: Q
    shape: tuple[int, int]  # (N, K) = (output features, input features)

    def __post_init__(self) -> None:
        assert self.offset_bytes >= 0 and len(self.shape) == 2, self

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.qtype, self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + self.nbytes


@dataclass(frozen=True)
class SlotLayout:
    """gate [I, D], up [I, D] and down [D, I] of one expert within a slot."""

    gate: SlotTensor
    up: SlotTensor
    down: SlotTensor

    def __post_init__(self) -> None:
        inter, hidden = self.gate.shape
        assert self.up.shape == (inter, hidden), (self.gate.shape, self.up.shape)
        assert self.down.shape == (hidden, inter), (self.gate.shape, self.down.shape)

    @property
    def slot_bytes(self) -> int:
        """Bytes a slot needs to hold the three projections."""
        return max(t.end_bytes for t in (self.gate, self.up, self.down))

    @property
    def fused_gate_up(self) -> SlotTensor | None:
        """gate and up as one [2I, D] tensor when up directly follows gate with the same type."""
        if self.up.qtype != self.gate.qtype or self.up.offset_bytes != self.gate.end_bytes:
            return None
        inter, hidden = self.gate.shape
        return SlotTensor(self.gate.offset_bytes, self.gate.qtype, (2 * inter, hidden))
