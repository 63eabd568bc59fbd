"""Open a GGUF file memory-mapped and check it is something moestream can run.

Every problem a user can cause (not a GGUF, truncated, unknown architecture, a missing
tensor, an unsupported block type, a header that disagrees with itself: see
file_check.py) becomes one MoestreamError naming the file and what is wrong, raised here
before any weight is touched.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from moestream.engine.config import ModelConfig
from moestream.engine.file_check import check_layout, check_strings, check_tensors
from moestream.engine import page_cache
from moestream.engine.header import read_gguf
from moestream.kernels.errors import MoestreamError
from moestream.kernels.formats import block_format

# Metadata arrays that can hold hundreds of thousands of entries; the tokenizer reads
# them straight from the reader, the config never needs them.
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges")


@dataclass(frozen=True)
class RawTensor:
    """A tensor's bytes as stored in the file (a view of the memory map)."""

    name: str
    qtype: GGMLQuantizationType
    dims: tuple[int, ...]  # torch order: slowest first, e.g. (n_expert, rows, cols)
    data: torch.Tensor  # uint8 [..., row_bytes] for block types, float for F32/F16/BF16

    @property
    def rows_cols(self) -> tuple[int, int]:
        return self.dims[-2] if len(self.dims) > 1 else 1, self.dims[-1]

    def as_bytes(self) -> torch.Tensor:
        """The raw bytes, uint8, with the leading dims kept and the last one in bytes."""
        return self.data if self.data.dtype == torch.uint8 else self.data.contiguous().view(torch.uint8)


@dataclass
class GGUFModelFile:
    path: Path
    reader: GGUFReader
    meta: dict[str, Any]
    tensors: dict[str, RawTensor]
    config: ModelConfig

    def tensor(self, name: str) -> RawTensor:
        if name not in self.tensors:
            raise MoestreamError(f"{self.path}: tensor {name!r} is missing; the file is "
                                 f"incomplete or not a {self.config.arch} model as llama.cpp names it")
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name in _BIG_ARRAYS or name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    return meta


def _raw_tensor(path: Path, t: Any) -> RawTensor:
    qtype = GGMLQuantizationType(int(t.tensor_type))
    dims = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    fmt = block_format(qtype, tensor_name=t.name)  # an unsupported type fails here, named
    expected = int(t.n_elements) // fmt.block_size * fmt.type_size
    if int(t.n_bytes) != expected or t.data.nbytes != expected:
        raise MoestreamError(f"{path}: tensor {t.name!r} holds {t.data.nbytes} bytes, expected "
                             f"{expected}; the file is truncated or corrupt: download it again")
    with warnings.catch_warnings():
        # read-only views of the file's pages: nothing writes into weights (a write would fault)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(np.asarray(t.data))
    return RawTensor(t.name, qtype, dims, data)


def open_gguf(path: str | Path, compute: bool = False) -> GGUFModelFile:
    """The checked file; `compute`: the engine will read its weights from this mapping, so the
    page cache is first brought into 2 MiB folios and the mapping advised (page_cache.py),
    which can read the whole file in: not for a header look (inspect, a check before loading)."""
    path = Path(path)
    # A read-only map: a copy-on-write one (mode 'c') is charged against the commit limit in
    # full, so under Linux's default overcommit a file larger than RAM + swap (GLM-4.5-Air's
    # 72 GB, gpt-oss-120b's 63 GB on a 32-64 GB host) failed to open with ENOMEM.
    if compute:  # 2 MiB page-cache folios: the CPU reads weights ~20% faster through them
        page_cache.prepare(path)
    reader = read_gguf(path)
    if compute:
        page_cache.advise(reader.data)
    check_strings(path, reader)  # before any string is decoded
    meta = read_metadata(reader)
    tensors = {t.name: _raw_tensor(path, t) for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise MoestreamError(f"{path}: tensor 'token_embd.weight' is missing; this is a vocab-only "
                             "or incomplete GGUF, not a model")
    vocab_size = tensors["token_embd.weight"].dims[0]
    config = ModelConfig.from_metadata(meta, vocab_size, str(path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    check_tensors(path, config, {name: t.dims for name, t in tensors.items()},
                  len(tokens.data) if tokens is not None else None)
    check_layout(path, reader, path.stat().st_size)
    return GGUFModelFile(path, reader, meta, tensors, config)
