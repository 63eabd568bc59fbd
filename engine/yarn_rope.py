"""Rotary embedding with YaRN's frequencies and cos/sin scale (engine/yarn.py)."""

from __future__ import annotations

import torch

from moestream.engine.config import RopeStyle
from moestream.engine.layers import Rope
from moestream.engine.yarn import YarnScaling


class YarnRope(Rope):
    def __init__(self, style: RopeStyle, dims: int, base: float, yarn: YarnScaling, device: torch.device):
        super().__init__(style, dims, base, 1.0, device)
        self.inv_freq = yarn.inv_freq(dims, base, device)
        self.mscale = yarn.mscale

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = super().tables(positions)
        return cos * self.mscale, sin * self.mscale
