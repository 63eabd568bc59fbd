"""Dequant-GEMV (decode) on the test device
(CUDA, or the CPU through the Triton interpreter) vs gguf.quants.dequantize + numpy matmul."""

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from moestream.kernels.reference import qmatmul_reference
from moestream.kernels.triton_gemv import GemvConfig, triton_gemv
from tests.kernels.triton_helpers import (
    RAGGED_K_TYPES, TRITON_TYPES, activations, assert_matches, poisoned, random_weight,
)


def _run(qtype: Q, m: int, n: int, k: int, dtype: torch.dtype, config: GemvConfig | None, seed: int,
         device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    raw, weight = random_weight(qtype, n, k, gen)
    x = activations(m, k, dtype, gen)
    expected = x.double().numpy() @ weight.T
    raw, x = raw.to(device), x.to(device)
    y = triton_gemv(x, raw, qtype, (n, k), config=config, out=poisoned((m, n), dtype, device))
    assert_matches(y, expected, dtype)
    assert_matches(y, qmatmul_reference(x, raw, qtype, (n, k)).double().cpu().numpy(), dtype)


@pytest.mark.parametrize("qtype", TRITON_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("m, dtype", [(1, torch.float16), (3, torch.float32)], ids=["m1-fp16", "m3-fp32"])
def test_gemv_every_type(qtype: Q, m: int, dtype: torch.dtype, device) -> None:
    _run(qtype, m, 64, 512, dtype, None, seed=int(qtype) * 10 + m, device=device)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.IQ2_XS], ids=lambda q: q.name)
def test_gemv_sixteen_rows(qtype: Q, device) -> None:
    _run(qtype, 16, 32, 256, torch.float32, None, seed=16, device=device)


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q8_0], ids=lambda q: q.name)
def test_gemv_split_k_and_ragged_rows(qtype: Q, device) -> None:
    """K split over 3 programs (of 8 tiles of 128, one split short); N = 40 is not a
    row-block multiple."""
    _run(qtype, 2, 40, 1024, torch.float32, GemvConfig(block_m=2, block_n=16, split_k=3, block_k=128), seed=3,
         device=device)


@pytest.mark.parametrize("qtype", [Q.Q5_K, Q.IQ2_S, Q.Q3_K], ids=lambda q: q.name)
def test_gemv_64_column_tiles(qtype: Q, device) -> None:
    _run(qtype, 1, 32, 512, torch.float16, GemvConfig(block_m=1, block_n=32, split_k=1, block_k=64), seed=64,
         device=device)


@pytest.mark.parametrize("qtype", RAGGED_K_TYPES, ids=lambda q: q.name)
def test_gemv_row_ending_inside_a_chunk(qtype: Q, device) -> None:
    """Rows of 320 = 256 + 64 columns: the last 256-column tile holds only two 32-blocks."""
    _run(qtype, 3, 24, 320, torch.float16, GemvConfig(block_m=4, block_n=8, split_k=2), seed=320,
         device=device)
