"""Torch reference dequantizers for the linear types: x = d * q (+ m), legacy and K-quants.

Each maps uint8 blocks [n, type_size] to float32 [n, block_size] with the same fp32
operations in the same order as gguf.quants / ggml-quants.c, so results match bit for bit.
"""

from functools import cache

import torch
from gguf import quants

from moestream.kernels.bits import unpack
from moestream.kernels.formats import BlockFormat


def plain_float(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    return fmt.read(blocks, "value").float()


def q8_0(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    return fmt.read(blocks, "qs").float() * fmt.read(blocks, "d").float()


def q4_0(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    q = unpack(fmt.read(blocks, "qs"), 16, 4, 2).int() - 8
    return fmt.read(blocks, "d").float() * q.float()


def q4_1(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    q = unpack(fmt.read(blocks, "qs"), 16, 4, 2).float()
    return fmt.read(blocks, "d").float() * q + fmt.read(blocks, "m").float()


def _q5(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    """The 5-bit quants 0..31 of Q5_0/Q5_1: low nibbles from qs, bit 4 from the qh word."""
    low = unpack(fmt.read(blocks, "qs"), 16, 4, 2)
    high = unpack(fmt.read(blocks, "qh"), 1, 1, 8)
    return (low | (high << 4)).int()


def q5_0(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    return fmt.read(blocks, "d").float() * (_q5(fmt, blocks) - 16).float()


def q5_1(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    q = _q5(fmt, blocks).float()
    return fmt.read(blocks, "d").float() * q + fmt.read(blocks, "m").float()


def q2_k(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = fmt.read(blocks, "scales")
    dl = (fmt.read(blocks, "d").float() * (scales & 0xF).float()).view(n, 16, 1)
    ml = (fmt.read(blocks, "dmin").float() * (scales >> 4).float()).view(n, 16, 1)
    q = unpack(fmt.read(blocks, "qs"), 32, 2, 4).float().view(n, 16, 16)
    return (dl * q - ml).view(n, -1)


def q3_k(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    packed = fmt.read(blocks, "scales")
    # 16 6-bit scales: low 4 bits are the nibbles of bytes 0-7, high 2 bits come from bytes 8-11.
    scales = unpack(packed[:, :8], 8, 4, 2) | (unpack(packed[:, 8:], 4, 2, 4) << 4)
    dl = (fmt.read(blocks, "d").float() * (scales.int() - 32).float()).view(n, 16, 1)
    low = unpack(fmt.read(blocks, "qs"), 32, 2, 4).int()
    high = unpack(fmt.read(blocks, "hmask"), 32, 1, 8).int()
    q = (low - ((high ^ 1) << 2)).float().view(n, 16, 16)  # a clear hmask bit subtracts 4
    return (dl * q).view(n, -1)


def k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each [n, 8]."""
    n = packed.shape[0]
    d, m, md = packed.view(n, 3, 4).unbind(1)
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    minimum = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, minimum


def _affine_k(fmt: BlockFormat, blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d * scale * q - dmin * min over 8 sub-blocks of 32, q as float [n, 8, 32]."""
    n = blocks.shape[0]
    scale, minimum = k_scale_min(fmt.read(blocks, "scales"))
    d = (fmt.read(blocks, "d").float() * scale.float()).view(n, 8, 1)
    dm = (fmt.read(blocks, "dmin").float() * minimum.float()).view(n, 8, 1)
    return (d * q - dm).view(n, -1)


def q4_k(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    q = unpack(fmt.read(blocks, "qs"), 32, 4, 2).float().view(-1, 8, 32)
    return _affine_k(fmt, blocks, q)


def q5_k(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    low = unpack(fmt.read(blocks, "qs"), 32, 4, 2)
    high = unpack(fmt.read(blocks, "qh"), 32, 1, 8)
    return _affine_k(fmt, blocks, (low | (high << 4)).float().view(-1, 8, 32))


def q6_k(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = (fmt.read(blocks, "d").float() * fmt.read(blocks, "scales").float()).view(n, 16, 1)
    low = unpack(fmt.read(blocks, "ql"), 64, 4, 2)
    high = unpack(fmt.read(blocks, "qh"), 32, 2, 4)
    q = ((low | (high << 4)).int() - 32).float().view(n, 16, 16)
    return (d * q).view(n, -1)


@cache
def e2m1_values(device: torch.device) -> torch.Tensor:
    """MXFP4's 16 e2m1 values, doubled (the E8M0 scale is halved to match), as float32 [16]."""
    return torch.tensor(quants.MXFP4.kvalues, dtype=torch.float32, device=device)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> 2**(e - 128) as float32, exactly (ggml_e8m0_to_fp32_half): e < 2 are
    the subnormals 2**-128 and 2**-127, e = 255 is 2**127 (no NaN)."""
    e = e.int()
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


def mxfp4(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    index = unpack(fmt.read(blocks, "qs"), 16, 4, 2).long()
    return e8m0_half(fmt.read(blocks, "e")) * e2m1_values(blocks.device)[index]
