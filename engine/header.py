"""What memory planning needs from a GGUF file: metadata and tensor infos, never tensor data.

Read from the header alone, so a plan can be made for any file llama.cpp's converter writes
(architectures moestream cannot run yet included) and for header-only synthetic files whose
data is a sparse hole (`moestream synth --no-weights`).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFReader

from moestream.engine.config import LinearAttnConfig, linear_attn_config
from moestream.kernels.errors import MoestreamError

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_LAYER = re.compile(r"blk\.(\d+)\.")


def read_gguf(path: str | Path, mode: str = "r") -> GGUFReader:
    """gguf's reader over `path`; a missing or unreadable file is one MoestreamError."""
    path = Path(path)
    if not path.is_file():
        raise MoestreamError(f"{path}: no such file; pass the path of a .gguf model")
    try:
        return GGUFReader(path, mode=mode)
    except Exception as exc:  # the reader raises many types on bad bytes
        raise MoestreamError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
                             "the file is truncated or corrupt, or not GGUF: download it again") from None


def _layer_of(name: str) -> int:
    """The block index of a `blk.N.` tensor; -1 for the others."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    dims: tuple[int, ...]  # torch order: slowest first
    nbytes: int  # as stored

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def is_block_quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES

    @property
    def is_routed_expert(self) -> bool:
        return self.name.endswith("_exps.weight")


@dataclass(frozen=True)
class ModelHeader:
    arch: str
    n_layers: int  # the layers the forward runs: block_count less the next-token-prediction blocks
    context_length: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    key_length: int  # per KV head (MLA: the latent plus its rope part)
    value_length: int
    vocab_size: int
    n_experts: int
    n_experts_used: int
    tensors: tuple[TensorInfo, ...]  # those the forward reads: none of a next-token-prediction block
    linear: LinearAttnConfig | None = None  # hybrid models: the DeltaNet layers (no KV, a state per sequence)

    @classmethod
    def from_reader(cls, reader: GGUFReader, source: str = "model") -> ModelHeader:
        fields = reader.fields

        def value(key: str, default: Any = None) -> Any:
            if key in fields:
                v = fields[key].contents()
                return max(v) if isinstance(v, list) else v  # per-layer arrays: the largest
            if default is None:
                raise MoestreamError(f"{source}: metadata key {key} is missing; the file is not a "
                                     "model as llama.cpp's converter writes it")
            return default

        arch = value("general.architecture")
        # NextN/MTP blocks (GLM-4.5, DeepSeek-V3 style) follow the last layer; moestream
        # never loads them, so they take no memory in the plan
        n_layers = int(value(f"{arch}.block_count")) - int(value(f"{arch}.nextn_predict_layers", 0))
        tensors = tuple(
            TensorInfo(t.name, GGMLQuantizationType(int(t.tensor_type)),
                       tuple(int(d) for d in reversed([int(x) for x in t.shape])), int(t.n_bytes))
            for t in reader.tensors if _layer_of(t.name) < n_layers)
        by_name = {t.name: t for t in tensors}
        if "token_embd.weight" not in by_name:
            raise MoestreamError(f"{source}: tensor 'token_embd.weight' is missing; this is a "
                                 "vocab-only or incomplete GGUF, not a model")
        d_model = int(value(f"{arch}.embedding_length"))
        n_heads = int(value(f"{arch}.attention.head_count"))
        key_length = int(value(f"{arch}.attention.key_length", d_model // n_heads))
        return cls(
            arch=arch,
            n_layers=n_layers,
            context_length=int(value(f"{arch}.context_length")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(value(f"{arch}.attention.head_count_kv", n_heads)),
            key_length=key_length,
            value_length=int(value(f"{arch}.attention.value_length", key_length)),
            vocab_size=by_name["token_embd.weight"].dims[0],
            n_experts=int(value(f"{arch}.expert_count", 0)),
            n_experts_used=int(value(f"{arch}.expert_used_count", 0)),
            tensors=tensors,
            linear=linear_attn_config({k: f.contents() for k, f in fields.items() if k.startswith(f"{arch}.")},
                                      arch, source),
        )

    @classmethod
    def read(cls, path: str | Path) -> ModelHeader:
        return cls.from_reader(read_gguf(path), str(path))

    def expert_bytes(self, layer: int) -> int:
        """One routed expert of `layer` (gate + up + down as stored); 0 for a dense layer."""
        total = 0
        for part in ("gate", "up", "down"):
            t = self.tensor(f"blk.{layer}.ffn_{part}_exps.weight")
            if t is None:
                return 0
            total += t.nbytes // t.dims[0]
        return total

    @property
    def routed_expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.is_routed_expert)

    @property
    def n_kv_layers(self) -> int:
        """Layers the KV cache holds: a hybrid model's DeltaNet layers keep none."""
        return self.n_layers - (sum(self.linear.recurrent_layers) if self.linear is not None else 0)

    def recurrent_state_bytes(self, n_sequences: int) -> int:
        return self.linear.state_bytes_per_seq * n_sequences if self.linear is not None else 0

    @property
    def n_moe_layers(self) -> int:
        return sum(1 for i in range(self.n_layers) if self.expert_bytes(i))

    def tensor(self, name: str) -> TensorInfo | None:
        return self._by_name.get(name)

    @functools.cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}
