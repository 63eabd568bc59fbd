"""YaRN rope scaling (GGUF `{arch}.rope.scaling.type` = "yarn"), as data and the frequencies it gives.

Pairs whose wavelength fits the original context many times keep their frequency
(extrapolation), pairs with long wavelengths are divided by the factor (interpolation),
with a linear ramp between the correction dims of beta_fast and beta_slow; cos and sin are
scaled by 0.1 ln(factor) + 1 (times the file's rope.scaling.attn_factor, as llama.cpp does).
llama.cpp floors/ceils the correction range; transformers does so unless the config says
`truncate: false`, which gpt-oss's does (so does OpenAI's reference): `truncate` is data on
the architecture (ArchSpec.yarn_truncate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class YarnScaling:
    factor: float  # rope.scaling.factor: context extension, > 1
    original_context: int  # rope.scaling.original_context_length
    beta_fast: float  # rope.scaling.yarn_beta_fast: rotations where extrapolation ends
    beta_slow: float  # rope.scaling.yarn_beta_slow: rotations where interpolation starts
    attn_factor: float  # rope.scaling.attn_factor: extra cos/sin scale (1 if absent)
    truncate: bool  # round the correction range outward to whole dims (llama.cpp always does)

    def __post_init__(self) -> None:
        assert self.factor > 0 and self.original_context > 0 and self.beta_fast > 0 and self.beta_slow > 0

    @property
    def mscale(self) -> float:
        """The factor on cos and sin: attention logits grow by its square."""
        grow = 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0
        return grow * self.attn_factor

    def _correction_dim(self, rotations: float, dims: int, base: float) -> float:
        return dims * math.log(self.original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    def inv_freq(self, dims: int, base: float, device: torch.device) -> torch.Tensor:
        """float64 [dims / 2]: each pair's frequency after YaRN's blend."""
        low = self._correction_dim(self.beta_fast, dims, base)
        high = self._correction_dim(self.beta_slow, dims, base)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dims - 1)
        if low == high:
            high += 0.001  # keeps the ramp finite, as both references do
        extrapolated = base ** (-torch.arange(0, dims, 2, dtype=torch.float64, device=device) / dims)
        ramp = ((torch.arange(dims // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: the pair keeps its frequency, 0: divided by the factor
        return extrapolated / self.factor * (1 - keep) + extrapolated * keep
