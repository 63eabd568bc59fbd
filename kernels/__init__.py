"""Lowest layer: GGUF block formats, exact torch dequantization, quantized matmul kernels."""

from moestream.kernels.dequant import dequantize
from moestream.kernels.errors import MoestreamError, UnsupportedQuantType
from moestream.kernels.formats import BLOCK_FORMATS, BlockFormat, block_format, random_blocks, row_bytes
from moestream.kernels.moe_ffn import moe_ffn
from moestream.kernels.dispatch import grouped_qmatmul, qmatmul
from moestream.kernels.reference import qmatmul_reference

__all__ = [
    "BLOCK_FORMATS",
    "BlockFormat",
    "MoestreamError",
    "UnsupportedQuantType",
    "block_format",
    "dequantize",
    "grouped_qmatmul",
    "moe_ffn",
    "qmatmul",
    "qmatmul_reference",
    "random_blocks",
    "row_bytes",
]
