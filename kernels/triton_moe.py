"""Grouped dequant-GEMM over expert-cache slots (after vLLM's fused_moe pattern).

Pairs (token, k) are sorted by expert and padded to BLOCK_M (kernels/moe_align.py). Program
(pid_m, pid_n) takes BLOCK_M pairs of one expert, looks the expert up in the
expert -> slot table, and multiplies their activation rows with BLOCK_N rows of that
expert's weight, read as raw GGUF bytes from `slot_buffer[slot, offset:]`. The routed weight
of each pair is applied in the epilogue when asked. Output row p belongs to pair p.

Slot strides and projection offsets that are multiples of 16 bytes let Triton specialize
on alignment and vectorize the byte loads (on sm_90 builds: half the registers).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as Q

from moestream.kernels.expert_layout import SlotTensor
from moestream.kernels.formats import block_format
from moestream.kernels.moe_align import MoeAlignment
from moestream.kernels.triton_configs import device_capability, tile_config
from moestream.kernels.triton_dequant_tiles import lookup_table
from moestream.kernels.triton_gemm import dot_tiles


@dataclass(frozen=True)
class GroupedConfig:
    block_n: int
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 2


def moe_block_m(n_pairs: int, n_experts: int) -> int:
    """Rows per program: 16 for decode-sized batches, up to 64 as experts fill up."""
    per_expert = triton.cdiv(max(n_pairs, 1), n_experts)
    return min(64, max(16, triton.next_power_of_2(per_expert)))


def grouped_config(block_m: int, qtype: Q, device: torch.device) -> GroupedConfig:
    """The GPU's tile from kernels/triton_configs.py."""
    if device.type != "cuda":  # the interpreter pays per program and step: few, large ones
        return GroupedConfig(block_n=64)
    return gpu_grouped_config(block_m, qtype, device_capability(torch.cuda.get_device_capability(device)))


def gpu_grouped_config(block_m: int, qtype: Q, capability: int) -> GroupedConfig:
    tile = tile_config(capability, "grouped", block_m, qtype)
    return GroupedConfig(tile.block_n, tile.block_k, tile.num_warps, tile.num_stages)


@triton.jit
def _grouped_kernel(
    x_ptr, slots_ptr, slot_of_expert_ptr, table_ptr, out_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    N, K, n_pairs, pairs_per_x_row, slot_stride, weight_offset, row_bytes, stride_xm, stride_om,
    QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, APPLY_WEIGHTS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < n_pairs
    pairs = tl.where(valid, pairs, 0)
    slot = tl.load(slot_of_expert_ptr + tl.load(expert_ids_ptr + pid_m)).to(tl.int64)
    weight = slots_ptr + slot * slot_stride + weight_offset
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N re-read row N-1 (in bounds); their results are never stored.
    w_rows = weight + tl.minimum(n, N - 1).to(tl.int64) * row_bytes
    x_rows = (pairs // pairs_per_x_row) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = dot_tiles(acc, x_ptr, x_rows, valid, w_rows, K, table_ptr, QTYPE, TYPE_SIZE, BLOCK_K)
    if APPLY_WEIGHTS:
        acc = acc * tl.load(topk_weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pairs[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (n[None, :] < N))


def triton_grouped_qmatmul(
    x: torch.Tensor, slot_buffer: torch.Tensor, slot_of_expert: torch.Tensor, weight: SlotTensor,
    alignment: MoeAlignment, topk_weights: torch.Tensor | None, config: GroupedConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of x (one per token, or one per pair) times their experts' W^T -> [n_pairs, N].

    Writes into `out` [n_pairs, N] (rows contiguous, x.dtype) when given. The caller
    (kernels.dispatch.grouped_qmatmul) has validated shapes, dtypes and devices.
    """
    n, k = weight.shape
    assert x.shape[1] == k and x.stride(1) == 1 and slot_buffer.stride(1) == 1
    pairs_per_x_row = alignment.n_pairs // x.shape[0]
    config = config or grouped_config(alignment.block_m, weight.qtype, x.device)
    if out is None:
        out = torch.empty((alignment.n_pairs, n), dtype=x.dtype, device=x.device)
    assert out.shape == (alignment.n_pairs, n) and out.dtype == x.dtype and out.stride(1) == 1
    fmt = block_format(weight.qtype)
    grid = (alignment.expert_ids.numel(), triton.cdiv(n, config.block_n))
    weights = topk_weights.reshape(-1) if topk_weights is not None else out  # out: unread placeholder
    _grouped_kernel[grid](
        x, slot_buffer, slot_of_expert, lookup_table(weight.qtype, x.device), out, weights,
        alignment.sorted_token_ids, alignment.expert_ids, alignment.num_tokens_post_pad,
        n, k, alignment.n_pairs, pairs_per_x_row, slot_buffer.stride(0), weight.offset_bytes,
        weight.row_bytes, x.stride(0), out.stride(0),
        QTYPE=int(weight.qtype), TYPE_SIZE=fmt.type_size,
        BLOCK_M=alignment.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, APPLY_WEIGHTS=topk_weights is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
