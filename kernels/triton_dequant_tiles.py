"""In-register dequantization of GGUF blocks for the Triton kernels.

Every kernel walks K in tiles of BLOCK_K = 32..256 columns and calls `dequant_tile`, which
turns the bytes of one tile of BLOCK_N weight rows into an fp32 [BLOCK_N, BLOCK_K] tile in
natural column order; the kernels then multiply it with activations (GEMV: multiply-add,
GEMM: `tl.dot`). A tile never straddles a 256-column super-block of the K and IQ types.

The raw GGUF bytes are read in place: no repacking. Several block sizes are not multiples
of 4 (Q8_0 34 B, Q4_0 and IQ4_NL 18 B, Q5_0 22 B, Q6_K 210 B, Q3_K 110 B, IQ2_XXS 66 B, ...),
and a projection inside an expert-cache slot starts where the one before it ends, at any
byte offset; so every field is read as uint8 and wider fields (fp16 scales, uint16/uint32
words, the elements of F32/F16/BF16 weights) are assembled from bytes. Within
a block the quant bytes of neighbouring columns are neighbouring bytes, so a warp's loads
stay coalesced. Each type is decoded on a 3-D view [BLOCK_N, groups, group_size] whose
group is the span sharing one scale, so a scale is loaded once per group, not per element.

Layouts follow llama.cpp `ggml/src/ggml-common.h` (`block_<type>`) and the
`dequantize_row_*` functions of `ggml-quants.c`; field offsets match kernels/formats.py.
Lookup tables (IQ4_NL/IQ4_XS values, IQ1/IQ2/IQ3 grids) come from the gguf package through
`lookup_table` and are passed to the kernels as a pointer.
"""

from functools import lru_cache

import gguf
import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as Q

SUPER_BLOCK: tl.constexpr = tl.constexpr(256)  # columns of one K/IQ super-block

# Type ids as compile-time constants: `dequant_tile` picks one decoder per compiled kernel.
_F32: tl.constexpr = tl.constexpr(int(Q.F32))
_F16: tl.constexpr = tl.constexpr(int(Q.F16))
_BF16: tl.constexpr = tl.constexpr(int(Q.BF16))
_Q8_0: tl.constexpr = tl.constexpr(int(Q.Q8_0))
_Q4_0: tl.constexpr = tl.constexpr(int(Q.Q4_0))
_Q4_1: tl.constexpr = tl.constexpr(int(Q.Q4_1))
_Q5_0: tl.constexpr = tl.constexpr(int(Q.Q5_0))
_Q5_1: tl.constexpr = tl.constexpr(int(Q.Q5_1))
_IQ4_NL: tl.constexpr = tl.constexpr(int(Q.IQ4_NL))
_Q2_K: tl.constexpr = tl.constexpr(int(Q.Q2_K))
_Q3_K: tl.constexpr = tl.constexpr(int(Q.Q3_K))
_Q4_K: tl.constexpr = tl.constexpr(int(Q.Q4_K))
_Q5_K: tl.constexpr = tl.constexpr(int(Q.Q5_K))
_Q6_K: tl.constexpr = tl.constexpr(int(Q.Q6_K))
_IQ4_XS: tl.constexpr = tl.constexpr(int(Q.IQ4_XS))
_IQ2_XXS: tl.constexpr = tl.constexpr(int(Q.IQ2_XXS))
_IQ2_XS: tl.constexpr = tl.constexpr(int(Q.IQ2_XS))
_IQ2_S: tl.constexpr = tl.constexpr(int(Q.IQ2_S))
_IQ3_XXS: tl.constexpr = tl.constexpr(int(Q.IQ3_XXS))
_IQ3_S: tl.constexpr = tl.constexpr(int(Q.IQ3_S))
_IQ1_S: tl.constexpr = tl.constexpr(int(Q.IQ1_S))
_IQ1_M: tl.constexpr = tl.constexpr(int(Q.IQ1_M))
_MXFP4: tl.constexpr = tl.constexpr(int(Q.MXFP4))
IQ1_DELTA: tl.constexpr = tl.constexpr(0.125)  # llama.cpp's IQ1S_DELTA and IQ1M_DELTA

_GRID_TYPES = (Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S)


@lru_cache(maxsize=None)
def _host_table(qtype: Q) -> torch.Tensor:
    if qtype in (Q.IQ4_XS, Q.IQ4_NL):  # the 16 non-linear 4-bit values of both types
        return torch.tensor(gguf.quants.IQ4_NL.kvalues, dtype=torch.int8)
    if qtype == Q.MXFP4:  # the 16 e2m1 values, doubled (the E8M0 scale is halved to match)
        return torch.tensor(gguf.quants.MXFP4.kvalues, dtype=torch.int8)
    if qtype in _GRID_TYPES:  # grid rows of 8 (IQ2) or 4 (IQ3) magnitudes, all < 64
        quant = getattr(gguf.quants, qtype.name)
        quant.init_grid()
        return torch.from_numpy(quant.grid.reshape(-1).astype(np.uint8))
    if qtype in (Q.IQ1_S, Q.IQ1_M):  # one grid of 2048 rows of 8 values in {-1, 0, 1}
        gguf.quants.IQ1_S.init_grid()
        return torch.from_numpy(gguf.quants.IQ1_S.grid.reshape(-1).astype(np.int8))
    return torch.zeros(1, dtype=torch.uint8)  # unused by types without a table


@lru_cache(maxsize=None)
def lookup_table(qtype: Q, device: torch.device) -> torch.Tensor:
    """The lookup table `dequant_tile` reads for `qtype`, on `device` (a dummy byte if none)."""
    return _host_table(qtype).to(device)


@triton.jit
def _u8(ptr):
    """Bytes at `ptr` as int32."""
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _f16(ptr):
    """The little-endian fp16 at byte `ptr` (any alignment) as fp32."""
    lo = tl.load(ptr).to(tl.uint16)
    hi = tl.load(ptr + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u32(ptr):
    """The little-endian uint32 at byte `ptr` (any alignment)."""
    b0 = tl.load(ptr).to(tl.uint32)
    b1 = tl.load(ptr + 1).to(tl.uint32)
    b2 = tl.load(ptr + 2).to(tl.uint32)
    b3 = tl.load(ptr + 3).to(tl.uint32)
    return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)


@triton.jit
def _ksign_negative(sign_index, j):
    """Bit j of llama.cpp's ksigns[sign_index]: 7 stored sign bits, the 8th is their parity."""
    p = sign_index ^ (sign_index >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    bits = sign_index | ((p & 1) << 7)
    return ((bits >> j) & 1) != 0


@triton.jit
def _k_scale_min(ptr, s):
    """6-bit scale and min of sub-block s (0..7) from the 12 packed bytes at `ptr` (Q4_K/Q5_K)."""
    j = s % 4
    a = _u8(ptr + j)
    b = _u8(ptr + 4 + j)
    c = _u8(ptr + 8 + j)
    low = s < 4
    scale = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
    minimum = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _float(row, col0, K, QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    # The tile's bytes as one contiguous run per row (vector loads where the row is aligned),
    # then each element's TYPE_SIZE bytes combined: their bit fields are disjoint, so the sum
    # is their OR. Bytes past the row end read as zero; the kernels zero those activations.
    i = col0 * TYPE_SIZE + tl.arange(0, BLOCK_K * TYPE_SIZE)
    raw = tl.load(row[:, None] + i[None, :], mask=i[None, :] < K * TYPE_SIZE, other=0)
    raw = tl.reshape(raw.to(tl.uint32), (row.shape[0], BLOCK_K, TYPE_SIZE))
    word = tl.sum(raw << (8 * tl.arange(0, TYPE_SIZE))[None, None, :], axis=2)
    if QTYPE == _F32:
        return word.to(tl.float32, bitcast=True)
    elif QTYPE == _F16:
        return word.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:  # BF16: the top half of an fp32
        return (word << 16).to(tl.float32, bitcast=True)


@triton.jit
def _block32(row, g0, NG: tl.constexpr, n_blocks, TYPE_SIZE: tl.constexpr):
    # Byte pointers [BLOCK_N, NG, 1] of 32-column blocks g0.. . Blocks past the row end are
    # clamped to the last one; the kernels zero the matching activations.
    s = (g0 + tl.arange(0, NG))[None, :, None]
    return row[:, None, None] + tl.minimum(s, n_blocks - 1) * TYPE_SIZE


@triton.jit
def _q8_0(blk, i):
    # fp16 d, int8 qs[32]
    q = tl.load(blk + 2 + i).to(tl.int8, bitcast=True).to(tl.float32)
    return _f16(blk) * q


@triton.jit
def _nibble(qs, i):
    # element i < 16 is the low nibble of qs[i], element i + 16 its high nibble
    return (_u8(qs + i % 16) >> (4 * (i // 16))) & 15


@triton.jit
def _fifth_bit(qh, i):
    # bit i of the little-endian uint32 qh (read bytewise: the field is only 2-byte aligned)
    return (_u8(qh + i // 8) >> (i % 8)) & 1


@triton.jit
def _q4_0(blk, i):
    # fp16 d, qs[16]
    return _f16(blk) * (_nibble(blk + 2, i) - 8).to(tl.float32)


@triton.jit
def _q4_1(blk, i):
    # fp16 d, fp16 m, qs[16]
    return _f16(blk) * _nibble(blk + 4, i).to(tl.float32) + _f16(blk + 2)


@triton.jit
def _q5_0(blk, i):
    # fp16 d, qh[4] (5th bits), qs[16]
    q = _nibble(blk + 6, i) | (_fifth_bit(blk + 2, i) << 4)
    return _f16(blk) * (q - 16).to(tl.float32)


@triton.jit
def _q5_1(blk, i):
    # fp16 d, fp16 m, qh[4] (5th bits), qs[16]
    q = _nibble(blk + 8, i) | (_fifth_bit(blk + 4, i) << 4)
    return _f16(blk) * q.to(tl.float32) + _f16(blk + 2)


@triton.jit
def _iq4_nl(blk, table, i):
    # fp16 d, qs[16] (nibble indices into the 16 int8 values of table)
    return _f16(blk) * tl.load(table + _nibble(blk + 2, i)).to(tl.float32)


@triton.jit
def _mxfp4(blk, table, i):
    # E8M0 e, qs[16] (nibble indices into the 16 doubled e2m1 values of table). The scale is
    # 2**(e - 128) built as fp32 bits (ggml_e8m0_to_fp32_half): e < 2 are subnormals.
    e = _u8(blk)
    bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.to(tl.float32, bitcast=True) * tl.load(table + _nibble(blk + 1, i)).to(tl.float32)


@triton.jit
def _q2_k(b, g0, NG: tl.constexpr):
    # scales[16] (low nibble scale, high nibble min), qs[64] 2-bit, fp16 d @80, dmin @82
    t = (g0 + tl.arange(0, NG))[None, :, None]
    i16 = tl.arange(0, 16)[None, None, :]
    s = t // 2
    q = (_u8(b + 16 + (s // 4) * 32 + (t % 2) * 16 + i16) >> (2 * (s % 4))) & 3
    sm = _u8(b + t)
    return _f16(b + 80) * (sm & 15).to(tl.float32) * q.to(tl.float32) - _f16(b + 82) * (sm >> 4).to(tl.float32)


@triton.jit
def _q3_k(b, g0, NG: tl.constexpr):
    # hmask[32] high bits (set bit = no -4 offset), qs[64] low 2 bits, scales[12] 6-bit, d @108
    t = (g0 + tl.arange(0, NG))[None, :, None]
    i16 = tl.arange(0, 16)[None, None, :]
    s = t // 2
    i = (t % 2) * 16 + i16
    low = (_u8(b + 32 + (s // 4) * 32 + i) >> (2 * (s % 4))) & 3
    high = (_u8(b + i) >> s) & 1
    q = low - 4 + 4 * high
    scale_lo = (_u8(b + 96 + t % 8) >> (4 * (t // 8))) & 15
    scale_hi = (_u8(b + 104 + t % 4) >> (2 * (t // 4))) & 3
    scale = (scale_lo | (scale_hi << 4)) - 32
    return _f16(b + 108) * scale.to(tl.float32) * q.to(tl.float32)


@triton.jit
def _q4_k(b, g0, NG: tl.constexpr):
    # fp16 d, fp16 dmin, scales[12], qs[128]: byte 32*(s//2)+i holds sub-blocks s (low, high)
    s = (g0 + tl.arange(0, NG))[None, :, None]
    i = tl.arange(0, 32)[None, None, :]
    scale, minimum = _k_scale_min(b + 4, s)
    q = (_u8(b + 16 + (s // 2) * 32 + i) >> (4 * (s % 2))) & 15
    return _f16(b) * scale * q.to(tl.float32) - _f16(b + 2) * minimum


@triton.jit
def _q5_k(b, g0, NG: tl.constexpr):
    # as Q4_K plus qh[32] @16 (bit s of byte i = 5th bit of element 32*s+i); qs @48
    s = (g0 + tl.arange(0, NG))[None, :, None]
    i = tl.arange(0, 32)[None, None, :]
    scale, minimum = _k_scale_min(b + 4, s)
    low = (_u8(b + 48 + (s // 2) * 32 + i) >> (4 * (s % 2))) & 15
    high = (_u8(b + 16 + i) >> s) & 1
    q = low | (high << 4)
    return _f16(b) * scale * q.to(tl.float32) - _f16(b + 2) * minimum


@triton.jit
def _q6_k(b, g0, NG: tl.constexpr):
    # ql[128] low nibbles, qh[64] 2-bit highs @128, int8 scales[16] @192, fp16 d @208
    t = (g0 + tl.arange(0, NG))[None, :, None]
    i16 = tl.arange(0, 16)[None, None, :]
    s = t // 2
    i = (t % 2) * 16 + i16
    half = s // 4
    low = (_u8(b + half * 64 + (s % 2) * 32 + i) >> (4 * ((s // 2) % 2))) & 15
    high = (_u8(b + 128 + half * 32 + i) >> (2 * (s % 4))) & 3
    q = (low | (high << 4)) - 32
    scale = tl.load(b + 192 + t).to(tl.int8, bitcast=True).to(tl.float32)
    return _f16(b + 208) * scale * q.to(tl.float32)


@triton.jit
def _iq4_xs(b, table, g0, NG: tl.constexpr):
    # fp16 d, uint16 scales_h @2, scales_l[4] @4, qs[128] @8 (nibble indices into table)
    s = (g0 + tl.arange(0, NG))[None, :, None]
    i = tl.arange(0, 32)[None, None, :]
    scales_h = _u8(b + 2) | (_u8(b + 3) << 8)
    scale_lo = (_u8(b + 4 + s // 2) >> (4 * (s % 2))) & 15
    scale = (scale_lo | (((scales_h >> (2 * s)) & 3) << 4)) - 32
    nibble = (_u8(b + 8 + s * 16 + i % 16) >> (4 * (i // 16))) & 15
    value = tl.load(table + nibble).to(tl.float32)
    return _f16(b) * scale.to(tl.float32) * value


@triton.jit
def _iq2_xxs(b, grid, g0, NG: tl.constexpr):
    # fp16 d, then per 32 elements: 4 grid-index bytes + uint32 (4x7 sign bits, 4-bit scale)
    g = (g0 + tl.arange(0, NG))[None, :, None]  # group of 8 elements
    j = tl.arange(0, 8)[None, None, :]
    sub = b + 2 + (g // 4) * 8
    aux = _u32(sub + 4)
    db = _f16(b) * (0.5 + (aux >> 28).to(tl.float32)) * 0.25
    magnitude = tl.load(grid + _u8(sub + g % 4) * 8 + j).to(tl.float32)
    negative = _ksign_negative(((aux >> (7 * (g % 4))) & 127).to(tl.int32), j)
    return tl.where(negative, -db, db) * magnitude


@triton.jit
def _iq2_xs(b, grid, g0, NG: tl.constexpr):
    # fp16 d, uint16 qs[32] @2 (9-bit grid index, 7-bit sign index), 4-bit scales[16] @66
    g = (g0 + tl.arange(0, NG))[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    word = _u8(b + 2 + 2 * g) | (_u8(b + 3 + 2 * g) << 8)
    scale = (_u8(b + 66 + g // 4) >> (4 * ((g // 2) % 2))) & 15
    db = _f16(b) * (0.5 + scale.to(tl.float32)) * 0.25
    magnitude = tl.load(grid + (word & 511) * 8 + j).to(tl.float32)
    negative = _ksign_negative(word >> 9, j)
    return tl.where(negative, -db, db) * magnitude


@triton.jit
def _iq2_s(b, grid, g0, NG: tl.constexpr):
    # fp16 d, qs[32] @2, sign bytes[32] @34, qh[8] @66 (2 high index bits each), scales @74
    g = (g0 + tl.arange(0, NG))[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    index = _u8(b + 2 + g) | (((_u8(b + 66 + g // 4) >> (2 * (g % 4))) & 3) << 8)
    scale = (_u8(b + 74 + g // 4) >> (4 * ((g // 2) % 2))) & 15
    db = _f16(b) * (0.5 + scale.to(tl.float32)) * 0.25
    magnitude = tl.load(grid + index * 8 + j).to(tl.float32)
    negative = ((_u8(b + 34 + g) >> j) & 1) != 0
    return tl.where(negative, -db, db) * magnitude


@triton.jit
def _iq3_xxs(b, grid, g0, NG: tl.constexpr):
    # fp16 d, qs[64] @2 (a grid index per 4 elements), uint32[8] @66 (4x7 sign bits, scale)
    g = (g0 + tl.arange(0, NG))[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    aux = _u32(b + 66 + (g // 4) * 4)
    db = _f16(b) * (0.5 + (aux >> 28).to(tl.float32)) * 0.5
    magnitude = tl.load(grid + _u8(b + 2 + 2 * g + j // 4) * 4 + j % 4).to(tl.float32)
    negative = _ksign_negative(((aux >> (7 * (g % 4))) & 127).to(tl.int32), j)
    return tl.where(negative, -db, db) * magnitude


@triton.jit
def _iq3_s(b, grid, g0, NG: tl.constexpr):
    # fp16 d, qs[64] @2, qh[8] @66 (9th index bit), sign bytes[32] @74, 4-bit scales[8] @106
    g = (g0 + tl.arange(0, NG))[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    entry = 2 * g + j // 4  # grid entry of 4 elements
    index = _u8(b + 2 + entry) | (((_u8(b + 66 + entry // 8) >> (entry % 8)) & 1) << 8)
    scale = (_u8(b + 106 + g // 8) >> (4 * ((g // 4) % 2))) & 15
    db = _f16(b) * (1.0 + 2.0 * scale.to(tl.float32))
    magnitude = tl.load(grid + index * 4 + j % 4).to(tl.float32)
    negative = ((_u8(b + 74 + g) >> j) & 1) != 0
    return tl.where(negative, -db, db) * magnitude


@triton.jit
def _iq1_s(b, grid, g0, NG: tl.constexpr):
    # fp16 d, qs[32] @2 (low 8 grid-index bits per 8 elements), uint16 qh[8] @34 per 32
    # elements: 4 x 3 high index bits, a 3-bit scale, the delta's sign in bit 15
    g = (g0 + tl.arange(0, NG))[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    word = _u8(b + 34 + 2 * (g // 4)) | (_u8(b + 35 + 2 * (g // 4)) << 8)
    index = _u8(b + 2 + g) | (((word >> (3 * (g % 4))) & 7) << 8)
    dl = _f16(b) * (2 * ((word >> 12) & 7) + 1).to(tl.float32)
    delta = tl.where((word & 0x8000) != 0, -IQ1_DELTA, IQ1_DELTA)
    return dl * (tl.load(grid + index * 8 + j).to(tl.float32) + delta)


@triton.jit
def _iq1_m(b, grid, g0, NG: tl.constexpr):
    # qs[32] (low 8 index bits), qh[16] @32 (per nibble: 3 high index bits, the delta's sign),
    # uint16 scales[4] @48: 3-bit scales per 16 elements, the fp16 d in their top nibbles
    g = (g0 + tl.arange(0, NG))[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    nibble = (_u8(b + 32 + g // 2) >> (4 * (g % 2))) & 15
    index = _u8(b + g) | ((nibble & 7) << 8)
    s = g // 2  # 3-bit scale s of 16: bits 3*(s%4).. of scales word s//4
    scale = ((_u8(b + 48 + 2 * (s // 4)) | (_u8(b + 49 + 2 * (s // 4)) << 8)) >> (3 * (s % 4))) & 7
    d_bits = ((_u8(b + 49) >> 4) | (_u8(b + 51) & 0xF0) | ((_u8(b + 53) >> 4) << 8) | ((_u8(b + 55) & 0xF0) << 8))
    d = d_bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    delta = tl.where((nibble & 8) != 0, -IQ1_DELTA, IQ1_DELTA)
    return d * (2 * scale + 1).to(tl.float32) * (tl.load(grid + index * 8 + j).to(tl.float32) + delta)


@triton.jit
def dequant_tile(row, kt, K, table, QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns kt*BLOCK_K .. kt*BLOCK_K + BLOCK_K-1 of the rows starting at byte pointers `row`.

    Returns fp32 [BLOCK_N, BLOCK_K]; BLOCK_K is 32, 64, 128 or 256, so a tile never straddles
    a 256-column super-block and always holds whole scale groups. Rows of the float and
    32-column block types (Q8_0, Q4_0, ...) may end inside a tile (K % BLOCK_K != 0); columns
    past K then repeat the last element or block, which the caller multiplies by zero
    activations.
    """
    tl.static_assert(BLOCK_K >= 32 and SUPER_BLOCK % BLOCK_K == 0, "BLOCK_K: 32, 64, 128 or 256")
    col0 = kt * BLOCK_K
    if QTYPE == _F32 or QTYPE == _F16 or QTYPE == _BF16:
        w = _float(row, col0, K, QTYPE, TYPE_SIZE, BLOCK_K)
    elif (QTYPE == _Q8_0 or QTYPE == _Q4_0 or QTYPE == _Q4_1 or QTYPE == _Q5_0 or QTYPE == _Q5_1
          or QTYPE == _IQ4_NL or QTYPE == _MXFP4):
        blk = _block32(row, col0 // 32, BLOCK_K // 32, K // 32, TYPE_SIZE)
        i = tl.arange(0, 32)[None, None, :]
        if QTYPE == _Q8_0:
            w = _q8_0(blk, i)
        elif QTYPE == _Q4_0:
            w = _q4_0(blk, i)
        elif QTYPE == _Q4_1:
            w = _q4_1(blk, i)
        elif QTYPE == _Q5_0:
            w = _q5_0(blk, i)
        elif QTYPE == _Q5_1:
            w = _q5_1(blk, i)
        elif QTYPE == _MXFP4:
            w = _mxfp4(blk, table, i)
        else:
            w = _iq4_nl(blk, table, i)
    else:
        b = row[:, None, None] + (col0 // SUPER_BLOCK) * TYPE_SIZE
        first = col0 % SUPER_BLOCK  # column of the tile inside its super-block
        if QTYPE == _Q2_K:
            w = _q2_k(b, first // 16, BLOCK_K // 16)
        elif QTYPE == _Q3_K:
            w = _q3_k(b, first // 16, BLOCK_K // 16)
        elif QTYPE == _Q4_K:
            w = _q4_k(b, first // 32, BLOCK_K // 32)
        elif QTYPE == _Q5_K:
            w = _q5_k(b, first // 32, BLOCK_K // 32)
        elif QTYPE == _Q6_K:
            w = _q6_k(b, first // 16, BLOCK_K // 16)
        elif QTYPE == _IQ4_XS:
            w = _iq4_xs(b, table, first // 32, BLOCK_K // 32)
        elif QTYPE == _IQ2_XXS:
            w = _iq2_xxs(b, table, first // 8, BLOCK_K // 8)
        elif QTYPE == _IQ2_XS:
            w = _iq2_xs(b, table, first // 8, BLOCK_K // 8)
        elif QTYPE == _IQ2_S:
            w = _iq2_s(b, table, first // 8, BLOCK_K // 8)
        elif QTYPE == _IQ3_XXS:
            w = _iq3_xxs(b, table, first // 8, BLOCK_K // 8)
        elif QTYPE == _IQ1_S:
            w = _iq1_s(b, table, first // 8, BLOCK_K // 8)
        elif QTYPE == _IQ1_M:
            w = _iq1_m(b, table, first // 8, BLOCK_K // 8)
        else:
            tl.static_assert(QTYPE == _IQ3_S, "dequant_tile: no Triton decoder for this type")
            w = _iq3_s(b, table, first // 8, BLOCK_K // 8)
    return tl.reshape(w, (row.shape[0], BLOCK_K))
