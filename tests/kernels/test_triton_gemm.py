"""Dequant-GEMM (prefill, tl.dot) on the test device
(CUDA, or the CPU through the Triton interpreter) vs gguf.quants.dequantize + numpy."""

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from moestream.kernels.reference import qmatmul_reference
from moestream.kernels.triton_gemm import GemmConfig, triton_gemm
from tests.kernels.triton_helpers import (
    RAGGED_K_TYPES, TRITON_TYPES, activations, assert_matches, poisoned, random_weight,
)


def _run(qtype: Q, m: int, n: int, k: int, dtype: torch.dtype, config: GemmConfig | None, seed: int,
         device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    raw, weight = random_weight(qtype, n, k, gen)
    x = activations(m, k, dtype, gen)
    expected = x.double().numpy() @ weight.T
    raw, x = raw.to(device), x.to(device)
    y = triton_gemm(x, raw, qtype, (n, k), config=config, out=poisoned((m, n), dtype, device))
    tf32 = device.type == "cuda"
    assert_matches(y, expected, dtype, tf32)
    assert_matches(y, qmatmul_reference(x, raw, qtype, (n, k)).double().cpu().numpy(), dtype, tf32)


@pytest.mark.parametrize("qtype", TRITON_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("m, dtype", [(16, torch.float32), (64, torch.float16)], ids=["m16-fp32", "m64-fp16"])
def test_gemm_every_type(qtype: Q, m: int, dtype: torch.dtype, device) -> None:
    _run(qtype, m, 64, 512, dtype, None, seed=int(qtype) * 100 + m, device=device)


@pytest.mark.parametrize("qtype", TRITON_TYPES, ids=lambda q: q.name)
def test_gemm_32_column_tiles(qtype: Q, device) -> None:
    """BLOCK_K = 32 (the GPU uses 64/128): tiles start inside super-blocks and scale groups
    are split across steps, which the 256-column default never does."""
    _run(qtype, 5, 64, 512, torch.float32, GemmConfig(block_m=16, block_n=64, block_k=32), seed=int(qtype),
         device=device)


@pytest.mark.parametrize("qtype", [Q.Q4_K, *RAGGED_K_TYPES], ids=lambda q: q.name)
def test_gemm_ragged_tiles(qtype: Q, device) -> None:
    """M = 37 and N = 80 end inside their tiles; 32-block and float types also end K
    (= 288) inside a tile."""
    k = 288 if qtype in RAGGED_K_TYPES else 256
    _run(qtype, 37, 80, k, torch.float16, GemmConfig(block_m=32, block_n=64, block_k=128), seed=37,
         device=device)
