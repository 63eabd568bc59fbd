"""Block formats as data, checked against llama.cpp's ggml-common.h and the gguf package."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants

from moestream.kernels import BLOCK_FORMATS, block_format, random_blocks

# Byte offsets of the ggml_half fields in ggml-common.h's block structs.
FP16_OFFSETS = {
    Q.Q8_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82),  # scales[16], qs[64], d, dmin
    Q.Q3_K: (108,),  # hmask[32], qs[64], scales[12], d
    Q.Q4_K: (0, 2),
    Q.Q6_K: (208,),  # ql[128], qh[64], scales[16], d
    Q.IQ4_XS: (0,),
    Q.IQ1_M: (),  # its scale is spread over the scales words' top nibbles
}

SUPPORTED = {
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
    "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S",
    "IQ1_S", "IQ1_M", "MXFP4",
}  # fmt: skip


def test_table_covers_the_supported_types() -> None:
    assert {q.name for q in BLOCK_FORMATS} == SUPPORTED


@pytest.mark.parametrize("qtype", list(BLOCK_FORMATS), ids=lambda q: q.name)
def test_sizes_match_gguf(qtype: Q) -> None:
    fmt = block_format(qtype)
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]
    assert sum(f.size for f in fmt.fields) == fmt.type_size


@pytest.mark.parametrize("qtype", list(FP16_OFFSETS), ids=lambda q: q.name)
def test_fp16_field_offsets_match_ggml_common(qtype: Q) -> None:
    assert block_format(qtype).fp16_fields == FP16_OFFSETS[qtype]


@pytest.mark.parametrize("qtype", list(BLOCK_FORMATS), ids=lambda q: q.name)
def test_random_blocks_give_finite_moderate_values(qtype: Q) -> None:
    gen = torch.Generator()
    gen.seed()
    fmt = block_format(qtype)
    blocks = random_blocks(qtype, 16, gen)
    assert blocks.dtype == torch.uint8 and blocks.shape == (16, fmt.type_size)
    values = quants.dequantize(blocks.numpy(), qtype)
    assert np.isfinite(values).all() and np.abs(values).max() < 1e5, f"seed {gen.initial_seed()}"
    assert np.count_nonzero(values) > values.size // 4  # scales are never all zero


def test_random_blocks_follow_the_generator() -> None:
    a = random_blocks(Q.IQ1_M, 4, torch.Generator().manual_seed(7))
    b = random_blocks(Q.IQ1_M, 4, torch.Generator().manual_seed(7))
    c = random_blocks(Q.IQ1_M, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
