"""Torch reference dequantizers for the codebook types (IQ*): values come from lookup tables.

The grids, the IQ2 sign table and the IQ4 non-linear values are taken from the gguf package
at first use (not copied here) and cached as tensors per device. Operations mirror
gguf.quants in order so results match bit for bit.
"""

from functools import cache

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, quants

from moestream.kernels.bits import sign_bits, unpack
from moestream.kernels.formats import BlockFormat, reinterpret

IQ1_DELTA = float(quants.IQ1_S.delta)  # grid shift of IQ1_S/IQ1_M, +-1/8


@cache
def grid(qtype: Q, device: torch.device) -> torch.Tensor:
    """The codebook of an IQ type as float32 [entries, values per entry]."""
    traits = getattr(quants, qtype.name)
    traits.init_grid()
    table = np.asarray(traits.grid, dtype=np.float32).reshape(traits.grid_shape)
    return torch.from_numpy(table.copy()).to(device)


@cache
def sign_table(device: torch.device) -> torch.Tensor:
    """IQ2/IQ3 ksigns: 7 stored sign bits -> 8 signs (even parity), float32 [128, 8] of +-1."""
    ksigns = np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8).reshape(-1, 1)
    return sign_bits(torch.from_numpy(ksigns.copy())).to(device)


@cache
def nl_values(device: torch.device) -> torch.Tensor:
    """IQ4_NL/IQ4_XS non-linear 4-bit values as float32 [16]."""
    return torch.tensor(quants.IQ4_NL.kvalues, dtype=torch.float32, device=device)


def _lookup(qtype: Q, index: torch.Tensor) -> torch.Tensor:
    return grid(qtype, index.device)[index.long()]


def _packed_signs(words: torch.Tensor) -> torch.Tensor:
    """[n, g] words holding four 7-bit sign indices in bits 0-27 -> signs [n, g, 4, 8]."""
    shifts = torch.tensor([0, 7, 14, 21], dtype=words.dtype, device=words.device)
    index = (words.unsqueeze(-1) >> shifts) & 0x7F
    return sign_table(words.device)[index.long()]


def iq2_xxs(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qs = fmt.read(blocks, "qs").view(n, 8, 8)  # per 32 values: 4 grid bytes, uint32 aux
    aux = reinterpret(qs[:, :, 4:].reshape(n, 32), torch.uint32).long()  # [n, 8]
    db = fmt.read(blocks, "d").float() * (0.5 + (aux >> 28).float()) * 0.25
    values = _lookup(Q.IQ2_XXS, qs[:, :, :4])  # [n, 8, 4, 8]
    return (db.view(n, 8, 1, 1) * values * _packed_signs(aux)).view(n, -1)


def _iq2_scales(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    """IQ2_XS/IQ2_S: 16 4-bit sub-block scales -> d * (0.5 + s) / 4 as [n, 16, 1, 1]."""
    scales = unpack(fmt.read(blocks, "scales"), 1, 4, 2).float()
    db = fmt.read(blocks, "d").float() * (0.5 + scales) * 0.25
    return db.view(-1, 16, 1, 1)


def iq2_xs(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qs = fmt.read(blocks, "qs").int()  # [n, 32]: 9-bit grid index, 7-bit sign index
    values = _lookup(Q.IQ2_XS, qs & 0x1FF).view(n, 16, 2, 8)
    signs = sign_table(blocks.device)[(qs >> 9).long()].view(n, 16, 2, 8)
    return (_iq2_scales(fmt, blocks) * values * signs).view(n, -1)


def iq2_s(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    high = unpack(fmt.read(blocks, "qh"), 1, 2, 4).int()
    values = _lookup(Q.IQ2_S, fmt.read(blocks, "qs").int() | (high << 8)).view(n, 16, 2, 8)
    signs = sign_bits(fmt.read(blocks, "signs")).view(n, 16, 2, 8)
    return (_iq2_scales(fmt, blocks) * values * signs).view(n, -1)


def iq3_xxs(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    aux = fmt.read(blocks, "scales_and_signs").long()  # [n, 8] uint32
    db = fmt.read(blocks, "d").float() * (0.5 + (aux >> 28).float()) * 0.5
    values = _lookup(Q.IQ3_XXS, fmt.read(blocks, "qs")).view(n, 8, 4, 8)
    return (db.view(n, 8, 1, 1) * values * _packed_signs(aux)).view(n, -1)


def iq3_s(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = unpack(fmt.read(blocks, "scales"), 1, 4, 2).int()
    db = fmt.read(blocks, "d").float() * (1 + 2 * scales).float()
    high = unpack(fmt.read(blocks, "qh"), 1, 1, 8).int()
    values = _lookup(Q.IQ3_S, fmt.read(blocks, "qs").int() | (high << 8)).view(n, 8, 4, 8)
    signs = sign_bits(fmt.read(blocks, "signs")).view(n, 8, 4, 8)
    return (db.view(n, 8, 1, 1) * values * signs).view(n, -1)


def _iq1_delta(flag: torch.Tensor) -> torch.Tensor:
    return torch.where(flag == 0, IQ1_DELTA, -IQ1_DELTA)


def iq1_s(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qh = fmt.read(blocks, "qh").int()  # [n, 8]: 4x3 index bits, 3-bit scale, delta sign
    dl = fmt.read(blocks, "d").float() * (2 * ((qh >> 12) & 7) + 1).float()
    delta = _iq1_delta(qh & 0x8000)
    high = unpack(qh, 1, 3, 4)
    values = _lookup(Q.IQ1_S, fmt.read(blocks, "qs").int() | (high << 8)).view(n, 8, 4, 8)
    return (dl.view(n, 8, 1, 1) * (values + delta.view(n, 8, 1, 1))).view(n, -1)


def _iq1_m_scale(words: torch.Tensor) -> torch.Tensor:
    """The fp16 super-block scale spread over the top nibbles of the 4 scale words -> [n, 1]."""
    shifts = torch.tensor([12, 8, 4, 0], dtype=words.dtype, device=words.device)
    bits = ((words & 0xF000) >> shifts).sum(dim=-1, keepdim=True)  # disjoint nibbles: sum == or
    as_bytes = torch.cat([bits & 0xFF, bits >> 8], dim=-1).to(torch.uint8)
    return as_bytes.view(torch.float16).float()


def iq1_m(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    words = fmt.read(blocks, "scales").int()  # [n, 4]
    scales = unpack(words, 1, 3, 4)  # 16 3-bit sub-block scales (top nibbles excluded)
    dl = _iq1_m_scale(words) * (2 * scales + 1).float()
    qh = unpack(fmt.read(blocks, "qh"), 1, 4, 2).int()  # [n, 32]: 3 index bits + delta sign
    delta = _iq1_delta(qh & 0x08).view(n, 8, 2, 2, 1)
    values = _lookup(Q.IQ1_M, fmt.read(blocks, "qs").int() | ((qh & 7) << 8)).view(n, 8, 2, 2, 8)
    return (dl.view(n, 8, 2, 1, 1) * (values + delta)).view(n, -1)


def iq4_nl(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    index = unpack(fmt.read(blocks, "qs"), 16, 4, 2).long()
    return fmt.read(blocks, "d").float() * nl_values(blocks.device)[index]


def iq4_xs(fmt: BlockFormat, blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    low = unpack(fmt.read(blocks, "scales_l"), 1, 4, 2).int()
    high = unpack(fmt.read(blocks, "scales_h").int(), 1, 2, 8)
    dl = (fmt.read(blocks, "d").float() * ((low | (high << 4)) - 32).float()).view(n, 8, 1)
    index = unpack(fmt.read(blocks, "qs"), 16, 4, 2).long()
    return (dl * nl_values(blocks.device)[index].view(n, 8, 32)).view(n, -1)
