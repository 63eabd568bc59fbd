"""Which GGML type llama.cpp gives each tensor for a file type such as Q4_K_M.

llama-quantize does not store every tensor in one type: a "mix" file type like Q4_K_M keeps
norms and routers in F32, gives the output head Q6_K, some attn_v and ffn_down layers Q6_K
and the rest Q4_K, and falls back to 32-block types where a row is not a multiple of 256.
This module restates those rules (llama.cpp `src/llama-quant.cpp`,
`llama_tensor_get_type_impl` and `tensor_type_fallback`, as vendored in llama-cpp-python
0.3.36) for the file types listed in FILE_TYPES, without an importance matrix. It decides
types only; `tools.synth` writes the bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType as FT

from moestream.kernels.errors import MoestreamError

# file type name -> (llama.cpp ftype, the default type of its quantized tensors)
FILE_TYPES: dict[str, tuple[FT, Q]] = {
    "F16": (FT.MOSTLY_F16, Q.F16),  # no mix: every quantizable tensor F16 (a converter's output)
    "Q8_0": (FT.MOSTLY_Q8_0, Q.Q8_0),
    "Q6_K": (FT.MOSTLY_Q6_K, Q.Q6_K),
    "Q5_K_M": (FT.MOSTLY_Q5_K_M, Q.Q5_K),
    "Q5_K_S": (FT.MOSTLY_Q5_K_S, Q.Q5_K),
    "Q4_K_M": (FT.MOSTLY_Q4_K_M, Q.Q4_K),
    "Q4_K_S": (FT.MOSTLY_Q4_K_S, Q.Q4_K),
    "Q3_K_L": (FT.MOSTLY_Q3_K_L, Q.Q3_K),
    "Q3_K_M": (FT.MOSTLY_Q3_K_M, Q.Q3_K),
    "Q3_K_S": (FT.MOSTLY_Q3_K_S, Q.Q3_K),
    "Q2_K": (FT.MOSTLY_Q2_K, Q.Q2_K),
    "IQ4_XS": (FT.MOSTLY_IQ4_XS, Q.IQ4_XS),
    "IQ4_NL": (FT.MOSTLY_IQ4_NL, Q.IQ4_NL),
    # gpt-oss's release mix: routed experts MXFP4, every other quantizable tensor Q8_0 (read
    # off llama-quantize MXFP4_MOE of a converted gpt-oss; ggml-org's gpt-oss-20b/120b GGUFs
    # carry Q8_0 embeddings and attention beside MXFP4 experts)
    "MXFP4_MOE": (FT.MOSTLY_MXFP4_MOE, Q.Q8_0),
}

# A 256-block type that does not fit a row falls back to a 32-block one (tensor_type_fallback).
_FALLBACK: dict[Q, Q] = {
    Q.IQ4_XS: Q.IQ4_NL, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}


class Category(Enum):
    """llama.cpp's tensor_category, found by the same name substrings in the same order."""

    OUTPUT = "output"
    TOKEN_EMBD = "token_embd"
    ATTN_QKV = "attn_qkv.weight"
    ATTN_KV_B = "attn_kv_b.weight"
    ATTN_V = "attn_v.weight"
    ATTN_K = "attn_k.weight"
    ATTN_Q = "attn_q.weight"
    ATTN_OUTPUT = "attn_output.weight"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


_SUBSTRING_CATEGORIES = [c for c in Category if c not in (Category.OUTPUT, Category.TOKEN_EMBD, Category.OTHER)]
_ATTN_V_LIKE = (Category.ATTN_V, Category.ATTN_QKV, Category.ATTN_KV_B)


def category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name == "token_embd.weight":
        return Category.TOKEN_EMBD
    return next((c for c in _SUBSTRING_CATEGORIES if c.value in name), Category.OTHER)


@dataclass(frozen=True)
class ModelFacts:
    """The hyperparameters llama.cpp's rules look at."""

    n_layers: int
    n_expert: int
    n_head: int
    n_head_kv: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv


@dataclass(frozen=True)
class TensorShape:
    name: str
    shape: tuple[int, ...]  # numpy order: the last dim is the row (llama.cpp's ne[0])

    @property
    def n_cols(self) -> int:
        return self.shape[-1]


def file_type(quant: str) -> tuple[FT, Q]:
    if quant not in FILE_TYPES:
        raise MoestreamError(f"quant {quant!r} is not one moestream can synthesize; "
                             f"pick one of {', '.join(FILE_TYPES)}")
    return FILE_TYPES[quant]


def is_quantizable(t: TensorShape) -> bool:
    """tensor_allows_quantization for the tensors MoE models have: 2-D/3-D weights that are
    neither norms nor expert routers."""
    return (len(t.shape) >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name
            and "ffn_gate_inp.weight" not in t.name)


def llama_cpp_order(names: Sequence[str]) -> list[str]:
    """The order llama-quantize visits tensors in (its weight map sorts by layer, then name);
    the attn_v counter that picks Q6_K layers depends on it."""

    def key(name: str) -> tuple[int, str]:
        match = re.match(r"blk\.(\d+)\.", name)
        return (int(match.group(1)) if match else -1, name)

    return sorted(names, key=key)


def tensor_types(tensors: Sequence[TensorShape], quant: str, facts: ModelFacts) -> dict[str, Q]:
    """Type of every tensor after `llama-quantize SRC DST <quant>` of a file whose 1-D
    tensors and routers are F32 (as convert_hf_to_gguf writes them)."""
    ftype, default = file_type(quant)
    if ftype == FT.MOSTLY_MXFP4_MOE:
        return {t.name: (Q.MXFP4 if "_exps." in t.name else Q.Q8_0) if is_quantizable(t) else Q.F32
                for t in tensors}
    names = [t.name for t in tensors]
    attn_v_names = [n for n in llama_cpp_order(names) if category(n) in _ATTN_V_LIKE]
    attn_v_index = {name: i for i, name in enumerate(attn_v_names)}
    rule = _Rule(ftype, default, facts, len(attn_v_names), "output.weight" in names)
    return {t.name: rule.quantized_type(t, attn_v_index.get(t.name, 0)) if is_quantizable(t) else Q.F32
            for t in tensors}


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pattern for the extra-bits layers: the first and last eighth, and
    every third layer between (C integer division)."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def _layer(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    if match is None:
        raise ValueError(f"tensor {name} has no layer number")
    return int(match.group(1))


def _fallback(qtype: Q, n_cols: int) -> Q:
    block = GGML_QUANT_SIZES[qtype][0]
    if n_cols % block == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if n_cols % GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


@dataclass(frozen=True)
class _Rule:
    ftype: FT
    default: Q
    facts: ModelFacts
    n_attn_v: int
    has_output: bool

    def quantized_type(self, t: TensorShape, i_attn_v: int) -> Q:
        if self.default in (Q.F16, Q.BF16, Q.F32):  # float file types have no mix
            return self.default
        return _fallback(self.choose(t, i_attn_v), t.n_cols)

    def choose(self, t: TensorShape, i_attn_v: int) -> Q:
        cat = category(t.name)
        if cat == Category.OUTPUT or (cat == Category.TOKEN_EMBD and not self.has_output):
            return self._output(t)
        if cat in _ATTN_V_LIKE:
            return self._attn_v(i_attn_v)
        if cat == Category.ATTN_K and self.facts.n_expert == 8:
            return Q.Q8_0  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
        if cat == Category.FFN_DOWN:
            return self._ffn_down(_layer(t.name))
        if cat == Category.ATTN_OUTPUT:
            return self._attn_output()
        return self.default

    def _output(self, t: TensorShape) -> Q:
        if t.n_cols % GGML_QUANT_SIZES[self.default][0]:
            return Q.Q8_0
        return self.default if self.default == Q.Q8_0 else Q.Q6_K

    def _attn_v(self, i: int) -> Q:
        ft, gqa = self.ftype, self.facts.n_gqa
        new = self.default
        if ft == FT.MOSTLY_Q2_K:
            new = Q.Q4_K if gqa >= 4 else Q.Q3_K
        elif ft == FT.MOSTLY_Q3_K_M:
            new = Q.Q5_K if i < 2 else Q.Q4_K
        elif ft == FT.MOSTLY_Q3_K_L:
            new = Q.Q5_K
        elif ft in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and gqa >= 4:
            new = Q.Q5_K
        elif ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i, self.n_attn_v):
            new = Q.Q6_K
        elif ft == FT.MOSTLY_Q4_K_S and i < 4:
            new = Q.Q5_K
        return Q.Q8_0 if self.facts.n_expert == 8 else new

    def _ffn_down(self, layer: int) -> Q:
        ft, n = self.ftype, self.facts.n_layers
        if ft == FT.MOSTLY_Q2_K:
            return Q.Q3_K
        if ft == FT.MOSTLY_Q3_K_M:
            return Q.Q5_K if layer < n // 16 else Q.Q4_K
        if ft == FT.MOSTLY_Q3_K_L:
            return Q.Q5_K
        if ft == FT.MOSTLY_Q4_K_M:
            return Q.Q6_K if _use_more_bits(layer, n) else self.default
        if ft in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and layer < n // 8:
            return Q.Q5_K
        if ft == FT.MOSTLY_Q5_K_M and _use_more_bits(layer, n):
            return Q.Q6_K
        if ft == FT.MOSTLY_Q4_K_S and layer < n // 8:
            return Q.Q5_K
        return self.default

    def _attn_output(self) -> Q:
        ft = self.ftype
        if self.facts.n_expert == 8:
            bumped = (FT.MOSTLY_Q2_K, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M, FT.MOSTLY_IQ4_NL,
                      FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q4_K_M, FT.MOSTLY_IQ4_XS)
            return Q.Q5_K if ft in bumped else self.default
        return {FT.MOSTLY_Q2_K: Q.Q3_K, FT.MOSTLY_Q3_K_M: Q.Q4_K,
                FT.MOSTLY_Q3_K_L: Q.Q5_K}.get(ft, self.default)
