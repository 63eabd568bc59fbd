"""GGUF block formats as data: the byte layout of one block of every supported type.

Layouts follow llama.cpp `ggml/src/ggml-common.h` (struct `block_<type>`); sizes are checked
against `gguf.GGML_QUANT_SIZES` at import. F32/F16/BF16 are one-element "blocks" so every
tensor goes through the same code path.
"""

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from moestream.kernels.errors import UnsupportedQuantType

@dataclass(frozen=True)
class Field:
    """A named run of bytes inside a block; `dtype` is how the bytes are read (little-endian)."""

    name: str
    offset: int  # bytes from the start of the block
    size: int  # bytes
    dtype: torch.dtype = torch.uint8

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class BlockFormat:
    """One block: `block_size` elements stored in `type_size` bytes, laid out as `fields`."""

    qtype: Q
    block_size: int  # elements per block
    type_size: int  # bytes per block
    fields: tuple[Field, ...]
    # IQ1_M keeps its fp16 super-block scale in the top nibbles of four uint16 words
    # starting at this byte offset (nibble i holds scale bits 4i..4i+3).
    nibble_fp16_scale_offset: int | None = None
    # MXFP4's scale is one E8M0 byte (a power of two, 2**(e - 127)) at this offset.
    e8m0_scale_offset: int | None = None

    def __post_init__(self) -> None:
        assert (self.block_size, self.type_size) == GGML_QUANT_SIZES[self.qtype], self.qtype
        ends = [0] + [f.end for f in self.fields]
        assert all(f.offset == end for f, end in zip(self.fields, ends)), f"{self.qtype.name}: gap"
        assert ends[-1] == self.type_size, f"{self.qtype.name}: fields cover {ends[-1]} bytes"

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def fp16_fields(self) -> tuple[int, ...]:
        """Byte offsets of the fp16 scale fields (F16's single element counts as one)."""
        return tuple(f.offset for f in self.fields if f.dtype == torch.float16)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} blocks have no field '{name}'")

    def read(self, blocks: torch.Tensor, name: str) -> torch.Tensor:
        """Field `name` of every block: uint8 [n, type_size] -> [n, size / itemsize]."""
        f = self.field(name)
        return reinterpret(blocks[:, f.offset : f.end], f.dtype)


def reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View uint8 bytes (last dim) as `dtype`; copies where layout or alignment forbid a view."""
    if dtype == torch.uint8:
        return raw
    raw = raw.contiguous()
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype)


def _fmt(qtype: Q, *fields: tuple, nibble_fp16_scale_offset: int | None = None,
         e8m0_scale_offset: int | None = None) -> BlockFormat:
    """Build a BlockFormat from (name, size[, dtype]) tuples laid end to end."""
    laid: list[Field] = []
    offset = 0
    for name, size, *dtype in fields:
        laid.append(Field(name, offset, size, *dtype))
        offset += size
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return BlockFormat(qtype, block_size, type_size, tuple(laid), nibble_fp16_scale_offset, e8m0_scale_offset)


_F16 = torch.float16
_FORMATS = (
    _fmt(Q.F32, ("value", 4, torch.float32)),
    _fmt(Q.F16, ("value", 2, _F16)),
    _fmt(Q.BF16, ("value", 2, torch.bfloat16)),
    _fmt(Q.Q8_0, ("d", 2, _F16), ("qs", 32, torch.int8)),
    _fmt(Q.Q4_0, ("d", 2, _F16), ("qs", 16)),
    _fmt(Q.Q4_1, ("d", 2, _F16), ("m", 2, _F16), ("qs", 16)),
    _fmt(Q.Q5_0, ("d", 2, _F16), ("qh", 4), ("qs", 16)),
    _fmt(Q.Q5_1, ("d", 2, _F16), ("m", 2, _F16), ("qh", 4), ("qs", 16)),
    _fmt(Q.Q2_K, ("scales", 16), ("qs", 64), ("d", 2, _F16), ("dmin", 2, _F16)),
    _fmt(Q.Q3_K, ("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2, _F16)),
    _fmt(Q.Q4_K, ("d", 2, _F16), ("dmin", 2, _F16), ("scales", 12), ("qs", 128)),
    _fmt(Q.Q5_K, ("d", 2, _F16), ("dmin", 2, _F16), ("scales", 12), ("qh", 32), ("qs", 128)),
    _fmt(Q.Q6_K, ("ql", 128), ("qh", 64), ("scales", 16, torch.int8), ("d", 2, _F16)),
    _fmt(Q.IQ4_NL, ("d", 2, _F16), ("qs", 16)),
    _fmt(Q.IQ4_XS, ("d", 2, _F16), ("scales_h", 2, torch.uint16), ("scales_l", 4), ("qs", 128)),
    # IQ2_XXS qs: 8 pairs of uint32 (4 grid-index bytes, then 4x7 sign bits + 4-bit scale).
    _fmt(Q.IQ2_XXS, ("d", 2, _F16), ("qs", 64)),
    _fmt(Q.IQ2_XS, ("d", 2, _F16), ("qs", 64, torch.uint16), ("scales", 8)),
    _fmt(Q.IQ2_S, ("d", 2, _F16), ("qs", 32), ("signs", 32), ("qh", 8), ("scales", 8)),
    _fmt(Q.IQ3_XXS, ("d", 2, _F16), ("qs", 64), ("scales_and_signs", 32, torch.uint32)),
    _fmt(Q.IQ3_S, ("d", 2, _F16), ("qs", 64), ("qh", 8), ("signs", 32), ("scales", 4)),
    _fmt(Q.IQ1_S, ("d", 2, _F16), ("qs", 32), ("qh", 16, torch.uint16)),
    _fmt(Q.IQ1_M, ("qs", 32), ("qh", 16), ("scales", 8, torch.uint16), nibble_fp16_scale_offset=48),
    # MXFP4 (gpt-oss experts): E8M0 scale e, qs[16] of e2m1 nibbles (low nibbles: elements
    # 0-15, high nibbles: 16-31), as block_mxfp4 in ggml-common.h.
    _fmt(Q.MXFP4, ("e", 1), ("qs", 16), e8m0_scale_offset=0),
)

BLOCK_FORMATS: dict[Q, BlockFormat] = {f.qtype: f for f in _FORMATS}


def block_format(qtype: Q | int, tensor_name: str | None = None) -> BlockFormat:
    """The layout of `qtype`; UnsupportedQuantType (naming the tensor) if we cannot decode it."""
    fmt = BLOCK_FORMATS.get(qtype)  # type: ignore[call-overload]
    if fmt is not None:
        return fmt
    try:
        type_name = Q(qtype).name
    except ValueError:
        type_name = f"unknown type id {int(qtype)}"
    where = f"tensor '{tensor_name}'" if tensor_name else "a tensor"
    supported = ", ".join(BLOCK_FORMATS[q].name for q in BLOCK_FORMATS)
    raise UnsupportedQuantType(
        f"{where} uses quantization type {type_name}, which moestream cannot decode. "
        f"Use a GGUF file quantized with a supported type ({supported}), "
        f"e.g. re-quantize with `llama-quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M`."
    )


def row_bytes(qtype: Q, cols: int, tensor_name: str | None = None) -> int:
    """Bytes of one row of `cols` elements; cols must be a whole number of blocks."""
    fmt = block_format(qtype, tensor_name)
    if cols % fmt.block_size:
        raise ValueError(
            f"{tensor_name or 'tensor'}: row of {cols} elements is not a multiple of the "
            f"{fmt.name} block size {fmt.block_size}"
        )
    return cols // fmt.block_size * fmt.type_size


def random_blocks(qtype: Q, n_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """Random blocks [n_blocks, type_size] uint8 whose float fields are finite and moderate.

    Quant bits are uniform random bytes; every fp16 scale (and every F32/F16/BF16 element)
    is +-2**u with u uniform in [-8, 0], and every E8M0 scale 2**u with integer u in [-9, -1],
    so dequantized values are finite, NaN-free test data.
    """
    fmt = block_format(qtype)
    shape = (n_blocks, fmt.type_size)
    blocks = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    for f in fmt.fields:
        if f.dtype.is_floating_point:
            count = f.size // f.dtype.itemsize
            values = _moderate_floats((n_blocks, count), generator).to(f.dtype)
            blocks[:, f.offset : f.end] = values.view(torch.uint8).reshape(n_blocks, f.size)
    if fmt.nibble_fp16_scale_offset is not None:
        _set_nibble_fp16_scale(blocks, fmt.nibble_fp16_scale_offset, generator)
    if fmt.e8m0_scale_offset is not None:
        exponent = torch.randint(127 - 9, 127, (n_blocks,), generator=generator, dtype=torch.uint8)
        blocks[:, fmt.e8m0_scale_offset] = exponent
    return blocks


def _moderate_floats(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    magnitude = torch.exp2(-8 * torch.rand(shape, generator=generator))
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return magnitude * sign


def _set_nibble_fp16_scale(blocks: torch.Tensor, offset: int, generator: torch.Generator) -> None:
    """Write a finite fp16 into the top nibbles of the four uint16 words at `offset` (IQ1_M)."""
    n_blocks = blocks.shape[0]
    bits = _moderate_floats((n_blocks, 1), generator).half().view(torch.int16).int() & 0xFFFF
    for word in range(4):
        nibble = (bits[:, 0] >> (4 * word)) & 0xF
        high_byte = offset + 2 * word + 1  # little-endian: the word's top nibble is in byte 1
        blocks[:, high_byte] = (blocks[:, high_byte] & 0x0F) | (nibble << 4).to(torch.uint8)
