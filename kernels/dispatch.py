"""The one entry for a matmul with GGUF-quantized weights: y = x @ W^T, W kept as raw blocks.

backend="auto" runs the Triton kernels when x is on CUDA (GEMV for up to GEMV_MAX_ROWS
activation rows, tensor-core GEMM above; every block format has a Triton decoder, so a CUDA
matmul never dequantizes a whole weight), on CPU tensors the compiled CPU kernels in exact
mode (fp32 activations, weights decoded in registers; kernels/cpu) where the type has one,
and the torch reference (dequantize, then an fp32 matmul) otherwise. backend="triton"
forces the kernels (on CPU tensors they run under TRITON_INTERPRET=1); backend="torch"
forces the reference. Without the triton package (a CPU-only install: CUDA builds of torch bring it) "auto" never
picks Triton and "triton" says what to install.
backend="q8" runs the compiled CPU kernels (kernels/cpu) with activations rounded to int8
blocks as llama.cpp does: fast, about 0.7% from exact; CPU tensors only.
"""

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from moestream.kernels.cpu import cpu_qmatmul, has_cpu_kernel
from moestream.kernels.dequant import dequantize
from moestream.kernels.errors import MoestreamError
from moestream.kernels.expert_layout import SlotTensor
from moestream.kernels.formats import block_format, row_bytes
from moestream.kernels.moe_align import MoeAlignment, moe_align_block_size
from moestream.kernels.reference import qmatmul_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from moestream.kernels.triton_gemm import triton_gemm
    from moestream.kernels.triton_gemv import MAX_GEMV_ROWS, triton_gemv
    from moestream.kernels.triton_moe import moe_block_m, triton_grouped_qmatmul

Backend = Literal["auto", "triton", "torch", "q8"]
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Decode batches up to this many rows take the GEMV kernel, larger ones the tensor-core GEMM.
# A first guess from the instruction counts (M multiply-adds per weight on CUDA cores);
# tune with `python -m bench.kernels` on the target GPU.
GEMV_MAX_ROWS = 4
assert not HAS_TRITON or GEMV_MAX_ROWS <= MAX_GEMV_ROWS


def qmatmul(
    x: torch.Tensor, qweight: torch.Tensor, qtype: Q | int, shape: tuple[int, int],
    backend: Backend = "auto",
) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ W^T, W [N, K] given as its GGUF bytes -> [..., N] in x.dtype.

    qweight: uint8, contiguous, [N, row_bytes] or flat, on x's device.
    """
    qtype = block_format(qtype).qtype  # an unknown type id raises UnsupportedQuantType
    n, k = shape
    _check_activations(x, k)
    _check_bytes(qweight, "qweight", n * row_bytes(qtype, k), x.device)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if backend == "q8" and x.device.type != "cpu":
        raise ValueError("backend 'q8' runs on CPU tensors only")
    if uses_cpu_kernel(qtype, x.device, backend):
        y = cpu_qmatmul(x2, qweight, qtype, shape, exact=backend == "auto")
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    if not use_triton(qtype, x.device, backend) or x2.shape[0] == 0:
        return qmatmul_reference(x2, qweight, qtype, shape).reshape(*x.shape[:-1], n)
    kernel = triton_gemv if x2.shape[0] <= GEMV_MAX_ROWS else triton_gemm
    return kernel(x2, qweight, qtype, shape).reshape(*x.shape[:-1], n)


def grouped_qmatmul(
    x: torch.Tensor, slot_buffer: torch.Tensor, slot_of_expert: torch.Tensor, weight: SlotTensor,
    topk_ids: torch.Tensor, topk_weights: torch.Tensor | None = None, *,
    alignment: MoeAlignment | None = None, backend: Backend = "auto",
) -> torch.Tensor:
    """Each (token t, choice j) pair times its expert's W^T -> [T, k, N] in x.dtype.

    x: [T, K] (one row per token) or [T*k, K] (one row per pair, pair p = t*k + j).
    slot_buffer: uint8 [n_slots, slot_bytes]; expert e's W starts at byte weight.offset_bytes
    of slot slot_of_expert[e]. topk_ids: int [T, k]. topk_weights [T, k], if given, scales
    each pair's output (in the kernel's epilogue). `alignment` reuses a moe_align_block_size
    result across the projections of one layer (Triton backend only).
    """
    n, k = weight.shape
    n_tokens, top_k = topk_ids.shape
    _check_grouped_args(x, slot_buffer, slot_of_expert, weight, topk_ids, topk_weights)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if n_tokens * top_k == 0:
        return x.new_empty((n_tokens, top_k, n))
    if not use_triton(weight.qtype, x.device, backend):
        out = _grouped_reference(x, slot_buffer, slot_of_expert, weight, topk_ids, topk_weights)
        return out.view(n_tokens, top_k, n)
    if alignment is None:
        block_m = moe_block_m(topk_ids.numel(), slot_of_expert.numel())
        alignment = moe_align_block_size(topk_ids, slot_of_expert.numel(), block_m)
    if alignment.n_pairs != topk_ids.numel():
        raise ValueError(f"alignment covers {alignment.n_pairs} pairs, topk_ids {topk_ids.numel()}")
    out = triton_grouped_qmatmul(x, slot_buffer, slot_of_expert, weight, alignment, topk_weights)
    return out.view(n_tokens, top_k, n)


def _grouped_reference(
    x: torch.Tensor, slot_buffer: torch.Tensor, slot_of_expert: torch.Tensor, weight: SlotTensor,
    topk_ids: torch.Tensor, topk_weights: torch.Tensor | None,
) -> torch.Tensor:
    """Per-expert dequantize + fp32 matmul over the pairs routed to it -> [n_pairs, N]."""
    flat = topk_ids.reshape(-1)
    pairs_per_x_row = flat.numel() // x.shape[0]
    out = x.new_empty((flat.numel(), weight.shape[0]))
    for expert in torch.unique(flat).tolist():
        pairs = (flat == expert).nonzero().squeeze(1)
        slot = int(slot_of_expert[expert])
        raw = slot_buffer[slot, weight.offset_bytes : weight.end_bytes]
        y = F.linear(x[pairs // pairs_per_x_row].float(), dequantize(raw, weight.qtype, weight.shape))
        if topk_weights is not None:
            y = y * topk_weights.reshape(-1)[pairs, None].float()
        out[pairs] = y.to(x.dtype)
    return out


def uses_cpu_kernel(qtype: Q, device: torch.device, backend: Backend) -> bool:
    """Whether a matmul of `qtype` on `device` runs the compiled CPU kernels."""
    return device.type == "cpu" and backend in ("auto", "q8") and has_cpu_kernel(qtype)


def use_triton(qtype: Q, device: torch.device, backend: Backend) -> bool:
    """Whether a matmul of `qtype` on `device` runs the Triton kernels (see the module docstring).

    Every block format has a Triton decoder, so no CUDA matmul dequantizes a whole weight.
    """
    if backend not in ("auto", "triton", "torch", "q8"):
        raise ValueError(f"backend must be 'auto', 'triton', 'torch' or 'q8', got {backend!r}")
    block_format(qtype)  # an unknown type raises UnsupportedQuantType
    if backend == "triton" and not HAS_TRITON:
        raise MoestreamError("the triton kernels need the triton package: `pip install triton` (CUDA "
                             "builds of torch bring it), or use --kernels auto, q8 or torch")
    return backend == "triton" or (backend == "auto" and device.type == "cuda" and HAS_TRITON)


def _check_activations(x: torch.Tensor, k: int) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"activations {tuple(x.shape)} do not end in the weight's K = {k}")


def _check_bytes(raw: torch.Tensor, name: str, expected: int, device: torch.device) -> None:
    if raw.dtype != torch.uint8:
        raise TypeError(f"{name} must hold the raw GGUF bytes as uint8, got {raw.dtype}")
    if raw.device != device:
        raise ValueError(f"{name} is on {raw.device} but the activations are on {device}")
    if not raw.is_contiguous():
        raise ValueError(f"{name} must be contiguous; pass the tensor's bytes as stored")
    if raw.numel() != expected:
        raise ValueError(f"{name} holds {raw.numel()} bytes, the weight needs {expected}")


def _check_grouped_args(
    x: torch.Tensor, slot_buffer: torch.Tensor, slot_of_expert: torch.Tensor, weight: SlotTensor,
    topk_ids: torch.Tensor, topk_weights: torch.Tensor | None,
) -> None:
    block_format(weight.qtype)
    _check_activations(x, weight.shape[1])
    if x.dim() != 2 or x.shape[0] not in (topk_ids.shape[0], topk_ids.numel()):
        raise ValueError(
            f"x {tuple(x.shape)} must have one row per token ({topk_ids.shape[0]}) "
            f"or per (token, expert) pair ({topk_ids.numel()})"
        )
    if slot_buffer.dtype != torch.uint8 or slot_buffer.dim() != 2 or slot_buffer.stride(1) != 1:
        raise ValueError("slot_buffer must be a uint8 [n_slots, slot_bytes] tensor with contiguous rows")
    if weight.end_bytes > slot_buffer.shape[1]:
        raise ValueError(f"weight ends at byte {weight.end_bytes} but slots hold {slot_buffer.shape[1]}")
    for name, t in (("slot_buffer", slot_buffer), ("slot_of_expert", slot_of_expert), ("topk_ids", topk_ids)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if slot_of_expert.dim() != 1 or slot_of_expert.dtype not in (torch.int32, torch.int64):
        raise ValueError("slot_of_expert must be a 1-D int32/int64 tensor (expert id -> slot)")
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("topk_ids must be an int32/int64 [T, k] tensor")
    if topk_weights is not None:
        if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
            raise ValueError(f"topk_weights must be float {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")
        if topk_weights.device != x.device or not topk_weights.is_contiguous():
            raise ValueError("topk_weights must be contiguous and on x's device")
