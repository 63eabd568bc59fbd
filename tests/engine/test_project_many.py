"""project_many (an attention layer's q, k and v in one compiled call) against one Linear
call per matrix: bitwise the same on both CPU kernel routes, biases included, and, checked
independently, the q8 route within its int8 error of gguf's dequantized weights."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, quants

from moestream.engine.layers import Linear, project_many
from moestream.engine.loader import RawTensor
from moestream.kernels import block_format, random_blocks
from moestream.kernels.cpu.build import load_extension

pytestmark = pytest.mark.skipif(load_extension() is None, reason="no C++ compiler: the CPU kernels did not build")

K = 512
# OLMoE's Q4_K_M: q and k in Q4_K, v in Q6_K (one activation family); Q8_0 adds a second one
SHAPES = (("q", Q.Q4_K, 256), ("k", Q.Q4_K, 64), ("v", Q.Q6_K, 64), ("extra", Q.Q8_0, 96))


def _linears(backend: str, with_bias: bool, gen: torch.Generator) -> tuple[list[Linear], list[np.ndarray]]:
    linears, dense = [], []
    for name, qtype, rows in SHAPES:
        raw = random_blocks(qtype, rows * K // block_format(qtype).block_size, gen)
        bias = torch.randn(rows, generator=gen) if with_bias else None
        t = RawTensor(f"blk.0.attn_{name}.weight", qtype, (rows, K), raw.view(rows, -1))
        linears.append(Linear(t, bias, torch.float32, torch.device("cpu"), backend))
        dense.append(quants.dequantize(raw.numpy().reshape(rows, -1), qtype).astype(np.float64))
    return linears, dense


@pytest.mark.parametrize("backend", ["auto", "q8"])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bitwise_the_separate_calls(backend, rows, with_bias):
    gen = torch.Generator().manual_seed(rows * 10 + with_bias)
    linears, dense = _linears(backend, with_bias, gen)
    assert all(lin.weight is None for lin in linears)  # kept quantized: the fused route runs
    x = torch.randn(rows, K, generator=gen)
    fused = project_many(tuple(linears), x)
    for lin, y, w in zip(linears, fused, dense):
        assert torch.equal(y, lin(x))
        want = x.double().numpy() @ w.T + (lin.bias.double().numpy() if with_bias else 0)
        tol = 1e-5 if backend == "auto" else 3e-2  # fp32 rounding / int8 activations
        assert np.abs(y.double().numpy() - want).max() <= tol * np.abs(want).max()


def test_dense_weights_take_one_call_each():
    gen = torch.Generator().manual_seed(5)
    linears, _ = _linears("torch", False, gen)  # the torch backend decodes weights to floats
    assert all(lin.weight is not None for lin in linears)
    x = torch.randn(3, K, generator=gen)
    assert all(torch.equal(y, lin(x)) for lin, y in zip(linears, project_many(tuple(linears), x)))
