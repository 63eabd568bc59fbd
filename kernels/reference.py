"""Torch reference for a quantized matmul: the oracle the Triton kernels are tested against."""

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from moestream.kernels.dequant import dequantize


def qmatmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qtype: GGMLQuantizationType,
    shape: tuple[int, int],
) -> torch.Tensor:
    """y = x @ W.T for x [M, K] and W [N, K] = `shape` given as GGUF bytes.

    The math is fp32; the result has x's dtype.
    """
    weight = dequantize(qweight, qtype, shape)
    return F.linear(x.float(), weight).to(x.dtype)
