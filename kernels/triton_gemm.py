"""Dequant-GEMM for prefill: y[M, N] = x[M, K] @ W[N, K]^T, W in GGUF blocks.

Each program owns a [BLOCK_M, BLOCK_N] output tile. Per BLOCK_K columns it loads the
activation tile, dequantizes the weight tile in registers (kernels/triton_dequant_tiles.py),
casts it to the activation dtype and feeds `tl.dot` with an fp32 accumulator. fp32
activations go through `tl.dot`'s default precision (TF32 on tensor-core GPUs); fp16/bf16
activations multiply in their own type. `dot_tiles` is shared with the grouped MoE kernel.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as Q

from moestream.kernels.formats import block_format, row_bytes
from moestream.kernels.triton_configs import device_capability, tile_config
from moestream.kernels.triton_dequant_tiles import dequant_tile, lookup_table


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 2


def gemm_config(m: int, qtype: Q, device: torch.device) -> GemmConfig:
    """Smallest tensor-core row tile that covers M (16..64); the GPU's tile from
    kernels/triton_configs.py."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    if device.type != "cuda":  # the interpreter pays per program and step: few, large ones
        return GemmConfig(block_m, block_n=64)
    return gpu_gemm_config(block_m, qtype, device_capability(torch.cuda.get_device_capability(device)))


def gpu_gemm_config(block_m: int, qtype: Q, capability: int) -> GemmConfig:
    tile = tile_config(capability, "gemm", block_m, qtype)
    return GemmConfig(block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages)


@triton.jit
def dot_tiles(acc, x_ptr, x_rows, x_valid, w_rows, K, table_ptr,
              QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BM, BN] += x[rows, :K] @ W[rows, :K]^T, K walked in BLOCK_K-column tiles.

    x_rows [BM]: int32 element offsets of the activation rows from x_ptr (valid where
    x_valid; 32-bit offsets keep the gathered-row pointer math in few registers);
    w_rows [BN]: byte pointers to weight rows.
    """
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x_mask = x_valid[:, None] & (k[None, :] < K)
        x = tl.load(x_ptr + x_rows[:, None] + k[None, :], mask=x_mask, other=0.0)
        w = dequant_tile(w_rows, kt, K, table_ptr, QTYPE, TYPE_SIZE, BLOCK_K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc=acc)
    return acc


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, table_ptr, out_ptr, M, N, K, row_bytes, stride_xm, stride_om,
    QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N re-read row N-1 (in bounds); their results are never stored.
    w_rows = w_ptr + tl.minimum(n, N - 1).to(tl.int64) * row_bytes
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = dot_tiles(acc, x_ptr, m * stride_xm, m < M, w_rows, K, table_ptr, QTYPE, TYPE_SIZE, BLOCK_K)
    out = out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


def triton_gemm(
    x: torch.Tensor, qweight: torch.Tensor, qtype: Q, shape: tuple[int, int],
    config: GemmConfig | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ W^T with W [N, K] as raw GGUF bytes -> [M, N] in x.dtype.

    Writes into `out` [M, N] (rows contiguous, x.dtype) when given. The caller
    (kernels.dispatch.qmatmul) has validated devices, dtypes and byte counts.
    """
    n, k = shape
    m = x.shape[0]
    assert x.shape[1] == k and x.stride(1) == 1, (x.shape, x.stride())
    config = config or gemm_config(m, qtype, x.device)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.stride(1) == 1
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    _gemm_kernel[grid](
        x, qweight, lookup_table(qtype, x.device), out,
        m, n, k, row_bytes(qtype, k), x.stride(0), out.stride(0),
        QTYPE=int(qtype), TYPE_SIZE=block_format(qtype).type_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
