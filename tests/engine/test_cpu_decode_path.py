"""The CPU decode path's compiled shortcuts. project_many (an attention layer's q, k and v
in one compiled call) against one Linear call per matrix: bitwise the same on both CPU
kernel routes, biases included, and, checked independently, the q8 route within its int8
error of gguf's dequantized weights. The one-call decode attention (cpu_decode_attention,
checked against float64 formulas in tests/kernels/test_cpu_attention.py) is what the
fixtures' decode steps run, and their greedy tokens still match transformers'."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, quants

from moestream.engine import SamplingParams
from moestream.engine import model as model_module
from moestream.engine.layers import Linear, project_many
from moestream.engine.loader import RawTensor
from moestream.kernels import block_format, random_blocks
from moestream.kernels.cpu.build import load_extension
from tests.engine.test_generate import hf_greedy
from tests.fixtures.models import get_fixture, sample_token_ids

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


# OLMoE: q/k norm over all heads; Qwen3: per head, NEOX rope; Mixtral: GQA, no norm
@pytest.mark.parametrize("arch", ["olmoe", "qwen3moe", "mixtral"])
def test_decode_steps_run_the_one_call_attention(engine_for, arch, monkeypatch):
    calls = []
    fused = model_module.cpu_decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(model_module, "cpu_decode_attention", counted)
    fixture = get_fixture(arch)
    engine = engine_for(arch)
    prompt = sample_token_ids(fixture, 9, seed=21)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ours = [o.token_id for o in engine.generate(prompt, params)]
    assert len(calls) == 5 * engine.model.config.n_layers  # every decode step, every layer
    assert ours == hf_greedy(fixture, prompt, 6)
