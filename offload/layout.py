"""What one routed expert is, as bytes: three quantized projections laid end to end.

A slot blob (in pinned host memory or in a device cache slot) holds gate | up | down with no
padding, exactly the bytes GGUF stores for that expert, so a copy never repacks.
"""

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from moestream.kernels.expert_layout import SlotLayout, SlotTensor
from moestream.kernels.formats import row_bytes


@dataclass(frozen=True)
class ProjLayout:
    """One projection of one expert: `shape` is (rows, cols) in elements, `nbytes` its bytes."""

    qtype: GGMLQuantizationType
    shape: tuple[int, int]
    nbytes: int

    @classmethod
    def of(cls, qtype: GGMLQuantizationType, rows: int, cols: int) -> "ProjLayout":
        return cls(qtype, (rows, cols), rows * row_bytes(qtype, cols))


@dataclass(frozen=True)
class ExpertLayout:
    """gate [F, D], up [F, D], down [D, F] of one layer's experts (types may differ per part)."""

    gate: ProjLayout
    up: ProjLayout
    down: ProjLayout

    @property
    def expert_bytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @property
    def offsets(self) -> tuple[int, int, int]:
        """Byte offsets of gate, up and down inside a slot blob."""
        return 0, self.gate.nbytes, self.gate.nbytes + self.up.nbytes

    def slot_layout(self) -> SlotLayout:
        """The same blob as the grouped kernels (kernels.moe_ffn) address it inside a slot."""
        parts = (self.gate, self.up, self.down)
        return SlotLayout(*(SlotTensor(off, p.qtype, p.shape) for off, p in zip(self.offsets, parts)))


@dataclass
class ExpertWeights:
    """Raw uint8 1-D views of one expert's projections on the device that computes with them."""

    layout: ExpertLayout
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def from_blob(cls, layout: ExpertLayout, blob: torch.Tensor) -> "ExpertWeights":
        """Views of gate | up | down inside `blob` (1-D uint8, at least expert_bytes long)."""
        g, u, d = layout.offsets
        end = layout.expert_bytes
        return cls(layout, blob[g:u], blob[u:d], blob[d:end])

    @property
    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate, self.up, self.down
