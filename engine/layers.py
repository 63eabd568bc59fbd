"""Small building blocks of the forward: norms, rotary embedding, resident weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from kernels.dispatch import uses_cpu_kernel
from engine.config import RopeStyle
from engine.loader import RawTensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def dequantize_tensor(t: RawTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A whole resident tensor as floats (norms, biases, attention, router, lm_head)."""
    if t.data.dtype != torch.uint8:
        return t.data.reshape(t.dims).to(device=device, dtype=dtype)
    rows = 1
    for d in t.dims[:-1]:
        rows *= d
    w = kernels.dequantize(t.data.to(device), t.qtype, (rows, t.dims[-1]), tensor_name=t.name)
    return w.reshape(t.dims).to(dtype)


class Embedding:
    """token_embd kept as stored; only the looked-up rows are decoded."""

    def __init__(self, t: RawTensor, dtype: torch.dtype, device: torch.device):
        self.t, self.dtype, self.device = t, dtype, device
        self.d_model = t.dims[-1]

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.t.data[token_ids.cpu()]
        if rows.dtype != torch.uint8:
            return rows.to(device=self.device, dtype=self.dtype)
        out = kernels.dequantize(rows.to(self.device), self.t.qtype, (len(token_ids), self.d_model),
                                 tensor_name=self.t.name)
        return out.to(self.dtype)


class Rope:
    """Rotary embedding as llama.cpp applies it (NORM: adjacent pairs; NEOX: halves)."""

    def __init__(self, style: RopeStyle, dims: int, base: float, scale: float, device: torch.device):
        self.style, self.dims, self.scale = style, dims, scale
        self.inv_freq = base ** (-torch.arange(0, dims, 2, dtype=torch.float64, device=device) / dims)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, dims/2] of a batch's positions: made once per step, used by
        every layer."""
        angles = (positions.to(torch.float64)[:, None] * self.scale) * self.inv_freq[None, :]
        return angles.cos().to(torch.float32)[:, None, :], angles.sin().to(torch.float32)[:, None, :]

    def __call__(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [T, H, head_dim]; tables from `tables(positions)`
        cos, sin = tables
        rot, rest = x[..., : self.dims].float(), x[..., self.dims :]
        if self.style is RopeStyle.NEOX:
            a, b = rot[..., : self.dims // 2], rot[..., self.dims // 2 :]
            out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return torch.cat([out.to(x.dtype), rest], dim=-1)



class Linear:
    """y = x @ W^T (+ b). W is decoded to floats once, unless a kernel reads its blocks
    directly (the compiled CPU kernels): then the bytes stay as stored."""

    def __init__(self, t: RawTensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device, backend: str):
        self.bias, self.backend = bias, backend
        self.qtype, self.shape = t.qtype, t.rows_cols
        quantized = t.data.dtype == torch.uint8 and len(t.dims) == 2
        if quantized and uses_cpu_kernel(t.qtype, device, backend):
            self.raw, self.weight = t.data.reshape(-1), None
        else:
            self.raw, self.weight = None, dequantize_tensor(t, dtype, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        y = kernels.qmatmul(x, self.raw, self.qtype, self.shape, backend=self.backend)
        return y if self.bias is None else y + self.bias
