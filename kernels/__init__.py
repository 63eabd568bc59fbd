"""Lowest layer: GGUF block formats, exact torch dequantization, quantized matmul kernels."""

from kernels.dequant import dequantize
from kernels.errors import MoestreamError, UnsupportedQuantType
from kernels.formats import BLOCK_FORMATS, BlockFormat, block_format, random_blocks, row_bytes
from kernels.reference import qmatmul_reference

__all__ = [
    "BLOCK_FORMATS",
    "BlockFormat",
    "MoestreamError",
    "UnsupportedQuantType",
    "block_format",
    "dequantize",
    "qmatmul_reference",
    "random_blocks",
    "row_bytes",
]
