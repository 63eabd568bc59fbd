"""Is a GGUF file consistent with itself? Checked before any weight is read.

A single corrupt byte in a header (a download cut short and resumed badly, a bit flip on
disk) otherwise gives a model that loads and answers NaN, or allocates tens of GB per
request. Each check raises one MoestreamError naming the file, the key or tensor at
fault, and what to do. The rules are llama.cpp's where it has one: tensors follow each
other in header order, each padded to the alignment, and every tensor has the shape its
metadata gives it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from moestream.engine.arch_tensors import expected_tensors
from moestream.engine.config import ModelConfig
from moestream.kernels.errors import MoestreamError

_REDOWNLOAD = "the header is corrupt: download the file again"
_RECONVERT = "the file is corrupt or was converted wrongly: download or re-convert it"
_LAYER = re.compile(r"blk\.(\d+)\.")


def field_value(field: ReaderField, source: str = "") -> Any:
    """A metadata value as Python; a string that is not UTF-8 is an error naming its key."""
    try:
        return field.contents()
    except UnicodeDecodeError:
        raise _utf8_error(field, source) from None


def check_strings(path: Path, reader: GGUFReader) -> None:
    """Every string in the metadata (tokens, merges, chat template, names) is UTF-8."""
    for field in reader.fields.values():
        if field.types and field.types[-1] == GGUFValueType.STRING and _first_invalid_utf8(field):
            raise _utf8_error(field, str(path))


def _first_invalid_utf8(field: ReaderField) -> tuple[int, bytes] | None:
    """(entry, bytes) of the field's first string that is not UTF-8, if any."""
    for entry, part in enumerate(field.data):
        raw = field.parts[part].tobytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return entry, raw
    return None


def _utf8_error(field: ReaderField, source: str) -> MoestreamError:
    entry, raw = _first_invalid_utf8(field)
    where = f"entry {entry}: {raw[:40]!r}" if field.types[0] == GGUFValueType.ARRAY else repr(raw[:40])
    prefix = f"{source}: " if source else ""
    return MoestreamError(f"{prefix}metadata {field.name} is not valid UTF-8 ({where}); {_RECONVERT}")


def check_layout(path: Path, reader: GGUFReader, file_bytes: int) -> None:
    """Tensor data back to back in header order, each padded to the alignment, up to the
    end of the file: a changed size, type or offset in the header breaks the chain, and a
    tensor missing from the header leaves bytes at the end that nothing describes."""
    expected = reader.data_offset
    for t in reader.tensors:
        if t.data_offset != expected:
            raise MoestreamError(
                f"{path}: tensor {t.name!r} starts at byte {t.data_offset - reader.data_offset} of the "
                f"tensor data, but the tensors before it end at {expected - reader.data_offset}; "
                f"{_REDOWNLOAD}")
        expected += -(-int(t.n_bytes) // reader.alignment) * reader.alignment
    if file_bytes - expected >= reader.alignment:
        raise MoestreamError(
            f"{path}: the file holds {file_bytes - expected} bytes after its last tensor that no tensor "
            f"in the header describes (is a tensor missing from the header?); {_REDOWNLOAD}")


def check_tensors(path: Path, config: ModelConfig, shapes: dict[str, tuple[int, ...]],
                  n_tokens: int | None) -> None:
    """Every tensor the forward reads is present with the shape the metadata gives it, and
    the file holds no tensor a model of this architecture does not have."""
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    n_file_layers = max(layers) + 1 if layers else 0
    n_blocks = config.n_layers + config.n_nextn_layers  # block_count
    # llama.cpp loads a file whose NextN blocks were left out (trunk only) as well
    if n_file_layers not in (n_blocks, config.n_layers):
        raise MoestreamError(f"{path}: metadata {config.arch}.block_count = {n_blocks} but the "
                             f"file has tensors for {n_file_layers} layers; {_RECONVERT}")
    if n_tokens is not None and n_tokens != config.vocab_size:
        raise MoestreamError(f"{path}: tokenizer.ggml.tokens has {n_tokens} tokens but token_embd.weight "
                             f"has {config.vocab_size} rows; {_RECONVERT}")
    known, missing = set(), []
    for want in expected_tensors(config):
        known.add(want.name)
        shape = shapes.get(want.name)
        if shape is None:
            if want.is_required:
                missing.append(want.name)
        elif _ggml_shape(shape) != _ggml_shape(want.shape):
            _shape_error(path, want.name, shape, want.shape, want.keys)
    if missing:
        raise MoestreamError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                             f"the file is incomplete or not a {config.arch} model as llama.cpp names it")
    unknown = [name for name in shapes if name not in known]
    if unknown:
        raise MoestreamError(f"{path}: tensor {unknown[0]!r} is not one a {config.arch} model has; the "
                             "header is corrupt or this is a variant moestream does not run: download "
                             "or re-convert the file")


def _ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape as ggml compares it: [1, 256] is [256] (ggml pads every shape with 1s)."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _shape_error(path: Path, name: str, shape: tuple[int, ...], want: tuple[int, ...],
                 keys: tuple[str, ...]) -> None:
    if len(shape) == len(want):
        dim = next(d for d, (got, size) in enumerate(zip(shape, want)) if got != size)
        because = f" ({keys[dim]} = {want[dim]})"
    else:
        because = ""
    raise MoestreamError(f"{path}: tensor {name!r} is {list(shape)} but the metadata makes it "
                         f"{list(want)}{because}; {_RECONVERT}")
