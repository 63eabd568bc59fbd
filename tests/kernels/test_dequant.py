"""kernels.dequantize and qmatmul_reference against gguf's numpy dequantizers (the oracle)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import moestream.kernels.dequant as dequant_module
from moestream.kernels import (
    BLOCK_FORMATS,
    UnsupportedQuantType,
    block_format,
    dequantize,
    qmatmul_reference,
    random_blocks,
    row_bytes,
)

ALL_TYPES = list(BLOCK_FORMATS)


@pytest.fixture
def generator() -> torch.Generator:
    """Fresh random data every run; the seed is in the generator's repr for failure messages."""
    gen = torch.Generator()
    gen.seed()
    return gen


def _random_tensor(qtype: Q, rows: int, blocks_per_row: int, gen: torch.Generator):
    """Random raw bytes [rows, row_bytes] of a tensor of `blocks_per_row` blocks per row."""
    fmt = BLOCK_FORMATS[qtype]
    cols = fmt.block_size * blocks_per_row
    raw = random_blocks(qtype, rows * blocks_per_row, gen).reshape(rows, -1)
    return raw, cols


def _oracle(raw: torch.Tensor, qtype: Q) -> torch.Tensor:
    """gguf's numpy dequantization of the [rows, row_bytes] uint8 bytes, as float32 torch."""
    values = quants.dequantize(raw.contiguous().numpy(), qtype)
    return torch.from_numpy(np.array(values, dtype=np.float32))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_matches_gguf_bitwise(qtype: Q, rows: int, generator: torch.Generator) -> None:
    blocks_per_row = 3 if BLOCK_FORMATS[qtype].block_size > 1 else 96
    raw, cols = _random_tensor(qtype, rows, blocks_per_row, generator)
    expected = _oracle(raw, qtype)
    assert torch.isfinite(expected).all(), "random_blocks must give finite scales"

    got = dequantize(raw, qtype, (rows, cols), tensor_name="blk.0.ffn_up.weight")

    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert torch.equal(got, expected), f"seed {generator.initial_seed()}"


def test_mxfp4_every_scale_byte_matches_gguf(generator: torch.Generator) -> None:
    """All 256 E8M0 scales, the subnormal (e < 2) and overflowing (e * 12 > fp32 max) ones
    included, with every nibble value: bit for bit what gguf decodes, infinities too."""
    raw = random_blocks(Q.MXFP4, 256 * 4, generator).reshape(256 * 4, -1)
    raw[:, 0] = torch.arange(256, dtype=torch.uint8).repeat_interleave(4)
    raw[0::4, 1:] = torch.tensor([0x10 * (i + 1) % 256 + i for i in range(16)], dtype=torch.uint8)
    with np.errstate(over="ignore"):
        expected = _oracle(raw, Q.MXFP4)
    got = dequantize(raw, Q.MXFP4, (256 * 4, 32))
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), f"seed {generator.initial_seed()}"
    assert torch.isinf(expected).any() and (expected[:8].abs() < 2.0**-120).all()


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.IQ1_M], ids=lambda q: q.name)
def test_chunk_boundaries(qtype: Q, generator: torch.Generator, monkeypatch) -> None:
    """Several chunks, the last one partial, give the same values as one pass."""
    monkeypatch.setattr(dequant_module, "CHUNK_VALUES", 2 * BLOCK_FORMATS[qtype].block_size)
    raw, cols = _random_tensor(qtype, 7, 1, generator)
    got = dequantize(raw, qtype, (7, cols))
    assert torch.equal(got, _oracle(raw, qtype)), f"seed {generator.initial_seed()}"


@pytest.mark.parametrize(
    "qtype",
    [Q.F32, Q.BF16, Q.Q8_0, Q.Q5_1, Q.Q4_K, Q.IQ2_XS, Q.IQ3_XXS, Q.IQ1_S],
    ids=lambda q: q.name,
)
def test_strided_and_offset_views(qtype: Q, generator: torch.Generator) -> None:
    """Bytes at an odd storage offset, inside a wider buffer (non-contiguous), or 1-D."""
    rows = 3
    raw, cols = _random_tensor(qtype, rows, 2, generator)
    n_bytes = raw.shape[1]
    expected = _oracle(raw, qtype)

    wide = torch.zeros(rows, n_bytes + 7, dtype=torch.uint8)
    wide[:, 3 : 3 + n_bytes] = raw
    strided = wide[:, 3 : 3 + n_bytes]
    assert not strided.is_contiguous() and strided.storage_offset() % 2 == 1

    flat = torch.zeros(raw.numel() + 1, dtype=torch.uint8)
    flat[1:] = raw.reshape(-1)
    offset_flat = flat[1:]

    for view in (strided, offset_flat):
        got = dequantize(view, qtype, (rows, cols))
        assert torch.equal(got, expected), f"seed {generator.initial_seed()}"
    assert torch.equal(wide[:, 3 : 3 + n_bytes], raw), "input bytes must be left untouched"


def test_f32_result_does_not_alias_input(generator: torch.Generator) -> None:
    raw, cols = _random_tensor(Q.F32, 2, 8, generator)
    before = raw.clone()
    dequantize(raw, Q.F32, (2, cols)).fill_(0.0)
    assert torch.equal(raw, before)


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.TQ1_0, Q.Q8_K, Q.TQ2_0], ids=lambda q: q.name)
def test_unsupported_type_names_tensor_and_type(qtype: Q) -> None:
    name = "blk.3.ffn_down_exps.weight"
    with pytest.raises(UnsupportedQuantType) as info:
        dequantize(torch.zeros(64, dtype=torch.uint8), qtype, (1, 256), tensor_name=name)
    message = str(info.value)
    assert name in message and qtype.name in message and "Q4_K" in message


def test_wrong_byte_count_is_a_clear_error(generator: torch.Generator) -> None:
    raw, cols = _random_tensor(Q.Q4_K, 2, 2, generator)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight.*Q4_K.*576 bytes, got 575"):
        dequantize(raw.reshape(-1)[:-1], Q.Q4_K, (2, cols), tensor_name="blk.0.attn_q.weight")


def test_cols_not_whole_blocks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block size 256"):
        row_bytes(Q.Q4_K, 300)


def test_raw_must_be_bytes() -> None:
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(8, dtype=torch.int8), Q.Q4_0, (1, 32))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_row_bytes_matches_gguf(qtype: Q) -> None:
    cols = BLOCK_FORMATS[qtype].block_size * 4
    assert row_bytes(qtype, cols) == quants.quant_shape_to_byte_shape((cols,), qtype)[0]


def test_block_format_accepts_plain_ints() -> None:
    assert block_format(int(Q.Q6_K)).qtype is Q.Q6_K
    with pytest.raises(UnsupportedQuantType, match="unknown type id 999"):
        block_format(999, "token_embd.weight")


@pytest.mark.parametrize(
    ("qtype", "x_dtype", "rtol"),
    [
        (Q.Q4_K, torch.float32, 1e-5),
        (Q.IQ2_XS, torch.float32, 1e-5),
        (Q.Q8_0, torch.bfloat16, 1e-2),
    ],
    ids=["Q4_K-fp32", "IQ2_XS-fp32", "Q8_0-bf16"],
)
def test_qmatmul_reference_matches_numpy(
    qtype: Q, x_dtype: torch.dtype, rtol: float, generator: torch.Generator
) -> None:
    n, m = 6, 5
    raw, k = _random_tensor(qtype, n, 2, generator)
    x = torch.randn(m, k, generator=generator).to(x_dtype)

    y = qmatmul_reference(x, raw, qtype, (n, k))

    weight = quants.dequantize(raw.numpy(), qtype).astype(np.float64)
    expected = x.float().numpy().astype(np.float64) @ weight.T
    assert y.dtype == x_dtype and y.shape == (m, n)
    scale = np.abs(x.float().numpy()) @ np.abs(weight).T  # bound on accumulated rounding
    err = np.abs(y.double().numpy() - expected)
    assert (err <= rtol * scale + 1e-6).all(), f"seed {generator.initial_seed()}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_matches_gguf_bitwise_on_cuda(qtype: Q, generator: torch.Generator) -> None:
    blocks_per_row = 4 if BLOCK_FORMATS[qtype].block_size > 1 else 64
    raw, cols = _random_tensor(qtype, 3, blocks_per_row, generator)
    got = dequantize(raw.cuda(), qtype, (3, cols))
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), _oracle(raw, qtype)), f"seed {generator.initial_seed()}"
