"""YaRN rotary frequencies, as ggml's rope computes them (`rope_yarn`, `ggml_rope_yarn_corr_dims`).

Pairs that turn fast over the original context keep their frequency (extrapolation), slow
ones are divided by the scaling factor (interpolation), and a linear ramp over the pair
index blends the two in between. The rotation is not rescaled here: deepseek2's mscale
goes into the attention scale (YarnConfig.attention_mscale), as llama.cpp does.
"""

from __future__ import annotations

import math

import torch

from moestream.engine.config import RopeStyle, YarnConfig
from moestream.engine.layers import Rope


def _correction_dim(n_rotations: float, dims: int, base: float, original_context: int) -> float:
    """The pair index whose wavelength fits `n_rotations` times into the original context."""
    return dims * math.log(original_context / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dims: int, base: float, yarn: YarnConfig) -> torch.Tensor:
    """[dims / 2] float64 frequencies, the extrapolated and interpolated ones blended."""
    inv_freq = base ** (-torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    low = max(0.0, math.floor(_correction_dim(yarn.beta_fast, dims, base, yarn.original_context)))
    high = min(dims - 1.0, math.ceil(_correction_dim(yarn.beta_slow, dims, base, yarn.original_context)))
    pair = torch.arange(dims // 2, dtype=torch.float64)
    keep = 1 - ((pair - low) / max(0.001, high - low)).clamp(0, 1)  # 1: extrapolate, 0: interpolate
    return inv_freq * keep + inv_freq / yarn.factor * (1 - keep)


class YarnRope(Rope):
    """Rope whose frequencies are YaRN's."""

    def __init__(self, style: RopeStyle, dims: int, base: float, yarn: YarnConfig, device: torch.device):
        super().__init__(style, dims, base, 1.0, device)
        self.inv_freq = yarn_inv_freq(dims, base, yarn).to(device)
