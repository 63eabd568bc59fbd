"""Where things sit in a GGUF file's header, to corrupt one byte of them on purpose.

Offsets come from gguf's own reader (each field's parts and their sizes), so the tests
do not restate the GGUF format.
"""

from __future__ import annotations

from pathlib import Path

import gguf

# the parts of a tensor's header entry, in file order
TENSOR_PARTS = ("name_length", "name", "n_dims", "dims", "type", "offset")


def _part_offset(field, index: int) -> int:
    return field.offset + sum(int(part.nbytes) for part in field.parts[:index])


def value_offset(reader: gguf.GGUFReader, key: str, entry: int = 0) -> int:
    """The first byte of a metadata value (of entry `entry` for an array)."""
    field = reader.fields[key]
    return _part_offset(field, field.data[entry])


def count_offset(reader: gguf.GGUFReader, key: str) -> int:
    """The first byte of a header count: GGUF.tensor_count or GGUF.kv_count."""
    return reader.fields[key].offset


def tensor_offset(reader: gguf.GGUFReader, name: str, part: str) -> int:
    """The first byte of one part of a tensor's header entry (see TENSOR_PARTS)."""
    field = next(t.field for t in reader.tensors if t.name == name)
    return _part_offset(field, TENSOR_PARTS.index(part))


def flip_byte(src: Path, dst: Path, offset: int, xor: int) -> Path:
    """A copy of `src` with the byte at `offset` XORed with `xor`."""
    data = bytearray(src.read_bytes())
    data[offset] ^= xor
    dst.write_bytes(bytes(data))
    return dst


def set_byte(src: Path, dst: Path, offset: int, value: int) -> Path:
    """A copy of `src` with the byte at `offset` set to `value`."""
    data = bytearray(src.read_bytes())
    data[offset] = value
    dst.write_bytes(bytes(data))
    return dst
