"""Small building blocks of the forward: norms, rotary embedding, resident weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from moestream import kernels
from moestream.kernels.cpu import cpu_dequantize, cpu_qmatmul_many, has_cpu_kernel
from moestream.kernels.dispatch import uses_cpu_kernel
from moestream.kernels.triton_configs import TRITON_QTYPES
from moestream.engine.config import RopeStyle
from moestream.engine.loader import RawTensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, in fp32, then * weight in x's dtype:
    torch's op computes exactly that, in one call instead of seven (a decode token runs
    ~70 of them on OLMoE)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def dequantize_tensor(t: RawTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A whole resident tensor as floats (norms, biases, router; Linear weights when dense).
    Decoded on the host, so that no fp32 copy of a large weight passes through the device."""
    if t.data.dtype != torch.uint8:
        return t.data.reshape(t.dims).to(device=device, dtype=dtype)
    rows = 1
    for d in t.dims[:-1]:
        rows *= d
    w = kernels.dequantize(t.data, t.qtype, (rows, t.dims[-1]), tensor_name=t.name)
    return w.reshape(t.dims).to(dtype).to(device)


def keeps_quantized(qtype: GGMLQuantizationType, device: torch.device, backend: str, dense: bool) -> bool:
    """Whether a block-quantized Linear weight stays as stored: on CUDA unless dense weights
    were asked for (qmatmul reads the blocks), on the CPU where the compiled kernels read them
    or, with the triton backend, where the Triton interpreter runs CUDA's kernels on them."""
    if device.type == "cuda":
        return not dense
    if backend == "triton":
        return not dense and qtype in TRITON_QTYPES
    return uses_cpu_kernel(qtype, device, backend)


class Embedding:
    """token_embd kept as stored; only the looked-up rows are decoded."""

    def __init__(self, t: RawTensor, dtype: torch.dtype, device: torch.device):
        self.t, self.dtype, self.device = t, dtype, device
        self.d_model = t.dims[-1]

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.t.data[token_ids.cpu()]
        if rows.dtype != torch.uint8:
            return rows.to(device=self.device, dtype=self.dtype)
        if self.device.type == "cpu" and has_cpu_kernel(self.t.qtype):  # exact, in C++ (~100x the torch decode)
            return cpu_dequantize(rows.reshape(-1), self.t.qtype, (len(token_ids), self.d_model)).to(self.dtype)
        out = kernels.dequantize(rows.to(self.device), self.t.qtype, (len(token_ids), self.d_model),
                                 tensor_name=self.t.name)
        return out.to(self.dtype)


class Rope:
    """Rotary embedding as llama.cpp applies it (NORM: adjacent pairs; NEOX: halves)."""

    def __init__(self, style: RopeStyle, dims: int, base: float, scale: float, device: torch.device):
        self.style, self.dims, self.scale = style, dims, scale
        self.inv_freq = base ** (-torch.arange(0, dims, 2, dtype=torch.float64, device=device) / dims)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, dims] of a batch's positions, each angle repeated where
        its pair's two values sit, the sine negated where the pair's first value sits: made
        once per step, used by every layer."""
        angles = (positions.to(torch.float64)[:, None] * self.scale) * self.inv_freq[None, :]
        if self.style is RopeStyle.NEOX:
            angles = torch.cat([angles, angles], dim=-1)
            first = torch.arange(self.dims, device=angles.device) < self.dims // 2
        else:
            angles = angles.repeat_interleave(2, dim=-1)
            first = torch.arange(self.dims, device=angles.device) % 2 == 0
        sin = torch.where(first, -angles.sin(), angles.sin())
        return angles.cos().to(torch.float32)[:, None, :], sin.to(torch.float32)[:, None, :]

    def __call__(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [T, H, head_dim]; tables from `tables(positions)`
        if self.dims < x.shape[-1]:  # partial rotary: the tail passes through
            return torch.cat([self(x[..., : self.dims], tables), x[..., self.dims :]], dim=-1)
        cos, signed_sin = tables
        xf = x.float()
        # pair (a, b) -> (a cos - b sin, b cos + a sin), written as x cos + swapped(x) signed_sin:
        # the sign sits in the table (exact), so a layer runs three ops instead of eight
        return (xf * cos + self._swapped(xf) * signed_sin).to(x.dtype)

    def _swapped(self, x: torch.Tensor) -> torch.Tensor:
        """Each pair (a, b) -> (b, a)."""
        if self.style is RopeStyle.NEOX:
            return x.roll(self.dims // 2, dims=-1)
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


class Linear:
    """y = x @ W^T (+ b). W stays as stored where a kernel reads its blocks (`keeps_quantized`:
    qmatmul on CUDA, the compiled CPU kernels); else it is decoded once, to fp16 on CUDA
    (x is cast for the matmul, y comes back in x's dtype) and to `dtype` on the CPU."""

    def __init__(self, t: RawTensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device, backend: str, dense: bool = False):
        self.bias, self.backend = bias, backend
        self.qtype, self.shape = t.qtype, t.rows_cols
        quantized = t.data.dtype == torch.uint8 and len(t.dims) == 2
        if quantized and keeps_quantized(t.qtype, device, backend, dense):
            self.raw, self.weight = t.data.reshape(-1).to(device), None
        else:
            dense_dtype = torch.float16 if device.type == "cuda" else dtype
            self.raw, self.weight = None, dequantize_tensor(t, dense_dtype, device)

    @property
    def nbytes(self) -> int:
        return (self.raw if self.weight is None else self.weight).nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        if self.weight is not None:
            y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        else:
            y = kernels.qmatmul(x, self.raw, self.qtype, self.shape, backend=self.backend)
        return y if self.bias is None else y + self.bias


def project_many(linears: tuple[Linear, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """[linear(x) for each linear] (an attention layer's q, k and v): where all of them run
    the compiled CPU kernels, one call and one parallel region for all (bitwise the separate
    calls' results, kernels/cpu: cpu_qmatmul_many), else one call each."""
    backends = {lin.backend for lin in linears}
    if len(backends) > 1 or not all(lin.weight is None and uses_cpu_kernel(lin.qtype, x.device, lin.backend)
                                    for lin in linears):
        return [lin(x) for lin in linears]
    x2 = x.reshape(-1, x.shape[-1])
    ys = cpu_qmatmul_many(x2, [(lin.raw, lin.qtype, lin.shape) for lin in linears], exact=backends == {"auto"})
    out = []
    for lin, y in zip(linears, ys):
        y = y.to(x.dtype).reshape(*x.shape[:-1], lin.shape[0])
        out.append(y if lin.bias is None else y + lin.bias)
    return out
