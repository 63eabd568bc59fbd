"""Test data and checks shared by the Triton kernel tests.

Weights are fresh random GGUF blocks (kernels.formats.random_blocks); the independent
oracle is gguf.quants.dequantize followed by a float64 numpy matmul.
"""

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from moestream.kernels.formats import random_blocks, row_bytes

TRITON_TYPES = (
    Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q3_K, Q.Q2_K, Q.IQ4_XS,
    Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S,
    Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.F16, Q.BF16, Q.F32, Q.IQ1_S, Q.IQ1_M, Q.MXFP4,
)
# Types whose rows may end inside a 256-column tile: blocks of 32 columns or single elements.
RAGGED_K_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.MXFP4, Q.F16, Q.BF16, Q.F32)
# Max |error| relative to max |reference|: fp32 accumulates exactly enough for 1e-5; fp16
# rounds the output (and, in the GEMM, the dequantized weights) to 11 bits.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
# fp32 through `tl.dot` on a tensor-core GPU multiplies in TF32 (10-bit mantissa, as the fp16
# inputs' rounding): the GEMM's documented precision there (kernels/triton_gemm.py).
TF32_REL_TOL = 2e-3


def random_weight(qtype: Q, n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Raw bytes [n, row_bytes] of a random W [n, k] and W itself from gguf's dequantizer (float64)."""
    n_blocks = n * k // gguf.GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(qtype, n_blocks, generator).reshape(n, row_bytes(qtype, k))
    return raw, gguf.quants.dequantize(raw.numpy(), qtype).astype(np.float64)


def activations(m: int, k: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Small enough that x @ W^T of random blocks (|w| up to ~4000) stays far inside fp16 range."""
    return (torch.randn(m, k, generator=generator) / 32).to(dtype)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel forgets to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_matches(y: torch.Tensor, reference: np.ndarray, dtype: torch.dtype, tf32: bool = False) -> None:
    """y is finite and within REL_TOL[dtype] * max|reference| of the reference everywhere
    (TF32_REL_TOL for fp32 when `tf32`: a tl.dot kernel on CUDA)."""
    assert y.dtype == dtype and tuple(y.shape) == reference.shape
    got = y.double().cpu().numpy()
    assert np.isfinite(got).all(), "output has NaN/inf: an element was not written"
    scale = max(np.abs(reference).max(), 1e-30)
    error = np.abs(got - reference).max() / scale
    tolerance = TF32_REL_TOL if tf32 and dtype == torch.float32 else REL_TOL[dtype]
    assert error <= tolerance, f"max error {error:.2e} of max |ref| {scale:.3g}"
