"""Exact torch dequantization of GGUF tensors: the oracle for the Triton kernels and the CPU path.

Pure torch ops, so it runs on any device. Results equal gguf.quants.dequantize bit for bit.
"""

from typing import Callable

import torch
from gguf import GGMLQuantizationType as Q

from moestream.kernels import dequant_codebook as cb
from moestream.kernels import dequant_linear as lin
from moestream.kernels.formats import BLOCK_FORMATS, BlockFormat, block_format, row_bytes

BlockDequantizer = Callable[[BlockFormat, torch.Tensor], torch.Tensor]

DEQUANTIZERS: dict[Q, BlockDequantizer] = {
    Q.F32: lin.plain_float,
    Q.F16: lin.plain_float,
    Q.BF16: lin.plain_float,
    Q.Q8_0: lin.q8_0,
    Q.Q4_0: lin.q4_0,
    Q.Q4_1: lin.q4_1,
    Q.Q5_0: lin.q5_0,
    Q.Q5_1: lin.q5_1,
    Q.Q2_K: lin.q2_k,
    Q.Q3_K: lin.q3_k,
    Q.Q4_K: lin.q4_k,
    Q.Q5_K: lin.q5_k,
    Q.Q6_K: lin.q6_k,
    Q.IQ4_NL: cb.iq4_nl,
    Q.IQ4_XS: cb.iq4_xs,
    Q.IQ2_XXS: cb.iq2_xxs,
    Q.IQ2_XS: cb.iq2_xs,
    Q.IQ2_S: cb.iq2_s,
    Q.IQ3_XXS: cb.iq3_xxs,
    Q.IQ3_S: cb.iq3_s,
    Q.IQ1_S: cb.iq1_s,
    Q.IQ1_M: cb.iq1_m,
    Q.MXFP4: lin.mxfp4,
}
assert DEQUANTIZERS.keys() == BLOCK_FORMATS.keys()

# Work on ~1M output values at a time: keeps the int/float temporaries (several times the
# output) cache- and memory-friendly on big expert tensors.
CHUNK_VALUES = 1 << 20


def dequantize(
    raw: torch.Tensor,
    qtype: Q,
    shape: tuple[int, int],
    tensor_name: str | None = None,
) -> torch.Tensor:
    """Dequantize the bytes of a [rows, cols] tensor of type `qtype` to float32 [rows, cols].

    `raw` is uint8 of any shape (and any strides) holding exactly rows * row_bytes(cols) bytes;
    the result is on raw's device and never shares memory with it.
    """
    fmt = block_format(qtype, tensor_name)
    rows, cols = shape
    expected = rows * row_bytes(qtype, cols, tensor_name)
    name = tensor_name or "tensor"
    if raw.dtype != torch.uint8:
        raise TypeError(f"{name}: dequantize expects the raw bytes as uint8, got {raw.dtype}")
    if raw.numel() != expected:
        raise ValueError(
            f"{name}: {fmt.name} shape ({rows}, {cols}) needs {expected} bytes, got {raw.numel()}"
        )
    blocks = raw.reshape(-1, fmt.type_size)
    out = torch.empty(blocks.shape[0], fmt.block_size, dtype=torch.float32, device=raw.device)
    step = max(1, CHUNK_VALUES // fmt.block_size)
    dequantize_blocks = DEQUANTIZERS[fmt.qtype]
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = dequantize_blocks(fmt, blocks[start : start + step])
    return out.view(rows, cols)
