"""CPU kernels: quantized matmuls straight from GGUF blocks, compiled at first use."""

from moestream.kernels.cpu.attention import (attends_in_place, cpu_attend_one, cpu_decode_attention,
                                           has_compiled_attention)
from moestream.kernels.cpu.moe_layer import cpu_moe_layer
from moestream.kernels.cpu.norm import cpu_add_rms_norm
from moestream.kernels.cpu.qmatmul import (cpu_dequantize, cpu_expert_ffn, cpu_qmatmul, cpu_qmatmul_many,
                                          has_cpu_kernel)

__all__ = ["attends_in_place", "cpu_add_rms_norm", "cpu_attend_one", "cpu_decode_attention", "cpu_dequantize",
           "cpu_expert_ffn", "cpu_moe_layer", "cpu_qmatmul", "cpu_qmatmul_many", "has_compiled_attention",
           "has_cpu_kernel"]
