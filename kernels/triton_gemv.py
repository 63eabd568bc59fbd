"""Dequant-GEMV for decode: y[M, N] = x[M, K] @ W[N, K]^T for M <= 16, W in GGUF blocks.

Decode is memory-bound: every byte of W is read once and the work per byte is a few integer
ops and one multiply-add per activation row. Each program owns BLOCK_N weight rows and a
range of BLOCK_K-column tiles of K; it accumulates elementwise products in registers and reduces across K
only once at the end (no shuffles inside the loop). When the grid of row blocks is too
small to fill the GPU, K is split across programs (SPLIT_K) into an fp32 partial buffer
that is summed afterwards, which keeps the result deterministic.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as Q

from moestream.kernels.formats import block_format, row_bytes
from moestream.kernels.triton_configs import TileConfig, device_capability, tile_config
from moestream.kernels.triton_dequant_tiles import dequant_tile, lookup_table

MAX_GEMV_ROWS = 16
# 4 programs per SM keep loads in flight; K is split until the grid gets there.
_PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # activation rows, padded to a power of two
    block_n: int  # weight rows per program
    split_k: int  # programs sharing one row block along K
    block_k: int = 256  # columns per step: 32, 64, 128 or 256
    num_warps: int = 4
    num_stages: int = 1


def gemv_config(m: int, n: int, k: int, qtype: Q, device: torch.device) -> GemvConfig:
    """The GPU's config from kernels/triton_configs.py; split K until the grid covers the GPU."""
    block_m = triton.next_power_of_2(m)
    if device.type != "cuda":  # the interpreter pays per program and step: few, large ones
        return GemvConfig(block_m, block_n=max(2, 32 // block_m), split_k=1)
    props = torch.cuda.get_device_properties(device)
    capability = device_capability((props.major, props.minor))
    return gpu_gemv_config(m, n, k, qtype, props.multi_processor_count, capability)


def gpu_gemv_config(m: int, n: int, k: int, qtype: Q, n_sm: int, capability: int) -> GemvConfig:
    block_m = triton.next_power_of_2(m)
    tile = tile_config(capability, "gemv", block_m, qtype)
    block_n = gemv_block_n(tile, block_m)
    row_programs = triton.cdiv(n, block_n)
    n_tiles = triton.cdiv(k, tile.block_k)
    split_k = min(n_tiles, max(1, triton.cdiv(_PROGRAMS_PER_SM * n_sm, row_programs)))
    return GemvConfig(block_m, block_n, split_k, tile.block_k, tile.num_warps, tile.num_stages)


def gemv_block_n(tile: TileConfig, block_m: int) -> int:
    """Weight rows per program: the accumulator [BLOCK_M, BLOCK_N, BLOCK_K] keeps its size."""
    return max(2, tile.block_n // block_m)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, table_ptr, out_ptr,
    M, N, K, row_bytes, stride_xm, stride_split, stride_om, tiles_per_split,
    QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    # Rows past N re-read row N-1 (in bounds); their results are never stored.
    rows = w_ptr + tl.minimum(n, N - 1).to(tl.int64) * row_bytes
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for kt in range(first, last):
        k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x_mask = (m[:, None] < M) & (k[None, :] < K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
        w = dequant_tile(rows, kt, K, table_ptr, QTYPE, TYPE_SIZE, BLOCK_K)
        acc += w[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, axis=2)
    out = out_ptr + pid_k * stride_split + m[:, None] * stride_om + n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


def triton_gemv(
    x: torch.Tensor, qweight: torch.Tensor, qtype: Q, shape: tuple[int, int],
    config: GemvConfig | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 16, contiguous rows) @ W^T with W [N, K] as raw GGUF bytes -> [M, N] x.dtype.

    Writes into `out` [M, N] (contiguous, x.dtype) when given. The caller (kernels.dispatch.qmatmul)
    has validated devices, dtypes and byte counts.
    """
    n, k = shape
    m = x.shape[0]
    assert 1 <= m <= MAX_GEMV_ROWS and x.shape[1] == k and x.stride(1) == 1, (x.shape, x.stride())
    config = config or gemv_config(m, n, k, qtype, x.device)
    assert config.block_m >= m, (config, m)
    n_tiles = triton.cdiv(k, config.block_k)
    tiles_per_split = triton.cdiv(n_tiles, config.split_k)
    split_k = triton.cdiv(n_tiles, tiles_per_split)  # no empty splits
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.is_contiguous()
    if split_k == 1:
        partial = out[None]
    else:
        partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), split_k)
    _gemv_kernel[grid](
        x, qweight, lookup_table(qtype, x.device), partial,
        m, n, k, row_bytes(qtype, k), x.stride(0), partial.stride(0), partial.stride(1),
        tiles_per_split, QTYPE=int(qtype), TYPE_SIZE=block_format(qtype).type_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k > 1:
        out.copy_(partial.sum(0))
    return out
