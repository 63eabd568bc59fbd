"""Quantized matmuls on the CPU straight from GGUF bytes (no float copy of the weights).

Two routes over the same block decoders, over all cores (see docs/CPU-KERNELS.md for their
errors and measured rates): `exact=True` keeps the activations in float32 and accumulates
fp32 FMAs against each weight block decoded to floats (matches dequantize + F.linear to fp32
rounding); the default int8 route quantises the activation rows to int8 blocks like
llama.cpp's q8_K / q8_0 and runs integer dot products (faster, ~0.7% relative error).
Weights are the raw GGUF bytes, unchanged: nothing is repacked, so `prepare` is not needed. Without a compiler
every entry falls back to the torch reference (dequantize + F.linear).
"""

from functools import cache

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from moestream.kernels.cpu.build import load_extension
from moestream.kernels.dequant import dequantize
from moestream.kernels.formats import row_bytes


@cache
def _kernel_types() -> frozenset[int]:
    ext = load_extension()
    return frozenset(ext.supported_types()) if ext is not None else frozenset()


def has_cpu_kernel(qtype: GGMLQuantizationType) -> bool:
    """True if `qtype` runs in the compiled CPU kernels (False when they could not be built)."""
    return int(qtype) in _kernel_types()


def _checked(qweight: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    expected = rows * row_bytes(qtype, cols)
    if qweight.dtype != torch.uint8 or qweight.numel() != expected or qweight.device.type != "cpu":
        raise ValueError(f"{qtype.name} {shape} needs {expected} uint8 bytes on the CPU, "
                         f"got {qweight.numel()} {qweight.dtype} on {qweight.device}")
    return qweight.contiguous()  # the kernels read the bytes in order, whatever the shape


def _rows(x: torch.Tensor, cols: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != cols or x.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor [M, {cols}], got {tuple(x.shape)} on {x.device}")
    return x.to(torch.float32).contiguous()  # no copy when it already is


def cpu_qmatmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qtype: GGMLQuantizationType,
    shape: tuple[int, int],
    exact: bool = False,
) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] @ W.T, with W [N, K] = `shape` given as its GGUF bytes.

    exact: float32 activations and accumulation (else int8 activation blocks, ~0.7% error).
    """
    rows, cols = shape
    qweight, x = _checked(qweight, qtype, shape), _rows(x, cols)
    if not has_cpu_kernel(qtype):
        return F.linear(x, dequantize(qweight, qtype, shape))
    y = torch.empty(x.shape[0], rows)
    load_extension().qmatmul(x.data_ptr(), qweight.data_ptr(), int(qtype), x.shape[0], rows, cols, y.data_ptr(), exact)
    return y


def cpu_qmatmul_many(
    x: torch.Tensor,
    weights: list[tuple[torch.Tensor, GGMLQuantizationType, tuple[int, int]]],
    exact: bool = False,
) -> list[torch.Tensor]:
    """[x @ W_i.T for each (qweight, qtype, (N_i, K))]: several matrices of one input (the
    attention's q, k and v) in one parallel region, x quantised once per block family.

    Bitwise the results of one `cpu_qmatmul` per matrix (the same jobs on the same rows);
    one fork/join instead of one per matrix, which a loaded machine makes costly.
    """
    if not weights:
        return []
    cols = weights[0][2][1]
    x = _rows(x, cols)
    checked = []
    for qweight, qtype, shape in weights:
        if shape[1] != cols:
            raise ValueError(f"every matrix needs K = {cols} columns (x's), got {shape}")
        checked.append((_checked(qweight, qtype, shape), qtype, shape))
    if not all(has_cpu_kernel(qtype) for _, qtype, _ in checked):
        return [cpu_qmatmul(x, w, qtype, shape, exact) for w, qtype, shape in checked]
    ys = [torch.empty(x.shape[0], shape[0]) for _, _, shape in checked]
    mats = [(w.data_ptr(), int(qtype), shape[0], y.data_ptr()) for (w, qtype, shape), y in zip(checked, ys)]
    load_extension().qmatmul_many(x.data_ptr(), x.shape[0], cols, mats, exact)
    return ys


def cpu_dequantize(qweight: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> torch.Tensor:
    """W [N, K] float32 from its GGUF bytes, decoded in C++ over all cores."""
    qweight = _checked(qweight, qtype, shape)
    if not has_cpu_kernel(qtype):
        return dequantize(qweight, qtype, shape)
    out = torch.empty(shape)
    load_extension().dequantize(qweight.data_ptr(), int(qtype), *shape, out.data_ptr())
    return out


def cpu_expert_ffn(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    qtypes: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType],
    intermediate: int,
    exact: bool = False,
) -> torch.Tensor:
    """down(silu(gate x) * up x) [T, D] float32 for one expert, from its three GGUF byte runs.

    x is [T, D]; gate and up are W [intermediate, D], down is W [D, intermediate]. One call
    runs gate and up in one parallel pass and down in a second. exact: float32 activations
    and hidden row (else both are quantised to int8 blocks, ~2% error on the output).
    """
    d_model = x.shape[-1]
    x = _rows(x, d_model)
    gate_type, up_type, down_type = qtypes
    gate = _checked(gate, gate_type, (intermediate, d_model))
    up = _checked(up, up_type, (intermediate, d_model))
    down = _checked(down, down_type, (d_model, intermediate))
    if not all(has_cpu_kernel(q) for q in qtypes):
        h = F.silu(cpu_qmatmul(x, gate, gate_type, (intermediate, d_model), exact))
        h = h * cpu_qmatmul(x, up, up_type, (intermediate, d_model), exact)
        return cpu_qmatmul(h, down, down_type, (d_model, intermediate), exact)
    y = torch.empty_like(x)
    load_extension().expert_ffn(x.data_ptr(), gate.data_ptr(), up.data_ptr(), down.data_ptr(), int(gate_type),
                                int(up_type), int(down_type), x.shape[0], d_model, intermediate, y.data_ptr(), exact)
    return y
