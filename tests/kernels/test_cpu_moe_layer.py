"""cpu_moe_layer (a whole MoE layer in one compiled call) against the per-expert kernels and
against float64 matmuls on gguf.quants.dequantize weights.

The layer entry runs the same jobs on the same activation rows as `cpu_expert_ffn` called
expert by expert, so both routes must give exactly its numbers (the int8 route included:
its activation rows are quantised row by row, whatever rows share a call). The exact route
must also match the float64 SwiGLU on gguf's dequantized weights to fp32 rounding.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import moestream.kernels.cpu.build as build
import moestream.kernels.cpu.moe_layer as layer_module
from moestream.kernels import BLOCK_FORMATS, random_blocks
from moestream.kernels.cpu import cpu_expert_ffn, cpu_moe_layer

D_MODEL, INTER, N_EXPERTS, TOP_K = 256, 512, 6, 3
EXACT_TOLERANCE = 1e-5  # max |error| / max |y|, as for the exact matmuls
QTYPE_MIXES = [(Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.IQ3_S, Q.Q8_0, Q.IQ2_XXS)]


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    assert build.load_extension() is not None, "the C++ CPU kernels failed to build (see the log)"


@pytest.fixture
def generator() -> torch.Generator:
    gen = torch.Generator()
    gen.seed()
    return gen


def _part(qtype: Q, rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    raw = random_blocks(qtype, rows * cols // BLOCK_FORMATS[qtype].block_size, gen)
    return raw, quants.dequantize(raw.numpy(), qtype).astype(np.float64).reshape(rows, cols)


def _experts(qtypes: tuple[Q, Q, Q], gen: torch.Generator) -> tuple[list, dict]:
    """N_EXPERTS random experts as (id, gate, up, down) bytes, and their float64 weights."""
    experts, dense = [], {}
    for e in range(N_EXPERTS):
        (g, gw), (u, uw), (d, dw) = (_part(qtypes[0], INTER, D_MODEL, gen), _part(qtypes[1], INTER, D_MODEL, gen),
                                     _part(qtypes[2], D_MODEL, INTER, gen))
        experts.append((e, g, u, d))
        dense[e] = (gw, uw, dw)
    return experts, dense


def _routing(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct top-k expert ids per token and softmax-like weights."""
    ids = torch.stack([torch.randperm(N_EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, TOP_K, generator=gen), dim=-1)
    return ids, weights


def _per_expert(x, ids, weights, experts, qtypes, exact) -> torch.Tensor:
    """What the engine did before: one cpu_expert_ffn call per expert, on its tokens in order."""
    out = torch.zeros(*ids.shape, D_MODEL)
    for e, gate, up, down in experts:
        tok, kth = (ids == e).nonzero(as_tuple=True)
        if len(tok):
            out[tok, kth] = cpu_expert_ffn(x[tok], gate, up, down, qtypes, INTER, exact) * weights[tok, kth, None]
    return out


def _float64_layer(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, dense: dict) -> np.ndarray:
    xd, out = x.double().numpy(), np.zeros((*ids.shape, D_MODEL))
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            gw, uw, dw = dense[int(ids[t, j])]
            g, u = gw @ xd[t], uw @ xd[t]
            out[t, j] = float(weights[t, j]) * (dw @ (g / (1 + np.exp(-g)) * u))
    return out


def _inputs(tokens: int, qtypes: tuple[Q, Q, Q], gen: torch.Generator):
    experts, dense = _experts(qtypes, gen)
    ids, weights = _routing(tokens, gen)
    routed = [ex for ex in experts if (ids == ex[0]).any()]
    routed.reverse()  # the order experts arrive in must not matter
    x = torch.randn(tokens, D_MODEL, generator=gen)
    x *= 2 / (x.double().numpy() @ dense[0][0].T).std()  # gate pre-activations ~ N(0, 2): silu bends
    return x, ids, weights, routed, dense


@pytest.mark.parametrize("qtypes", QTYPE_MIXES, ids=lambda qs: "-".join(q.name for q in qs))
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("exact", [False, True], ids=["int8", "exact"])
def test_matches_per_expert_calls_bitwise(qtypes, tokens: int, exact: bool, generator: torch.Generator) -> None:
    x, ids, weights, routed, _ = _inputs(tokens, qtypes, generator)
    out = cpu_moe_layer(x, ids, weights, routed, qtypes, INTER, exact)
    assert out.shape == (tokens, TOP_K, D_MODEL) and out.dtype == torch.float32
    assert torch.equal(out, _per_expert(x, ids, weights, routed, qtypes, exact)), f"seed {generator.initial_seed()}"


@pytest.mark.parametrize("qtypes", QTYPE_MIXES, ids=lambda qs: "-".join(q.name for q in qs))
def test_exact_matches_float64_on_gguf_dequantize(qtypes, generator: torch.Generator) -> None:
    x, ids, weights, routed, dense = _inputs(5, qtypes, generator)
    out = cpu_moe_layer(x, ids, weights, routed, qtypes, INTER, exact=True).double().numpy()
    reference = _float64_layer(x, ids, weights, dense)
    error = np.abs(out - reference).max() / np.abs(reference).max()
    assert error <= EXACT_TOLERANCE, f"seed {generator.initial_seed()}: max error {error:.3g} of the output scale"


def test_independent_of_thread_count(generator: torch.Generator) -> None:
    """Uneven experts (prefill) split across threads by work compute the same numbers."""
    qtypes = QTYPE_MIXES[0]
    x, ids, weights, routed, _ = _inputs(40, qtypes, generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_moe_layer(x, ids, weights, routed, qtypes, INTER, exact=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(cpu_moe_layer(x, ids, weights, routed, qtypes, INTER, exact=True), single)


def test_without_kernel_falls_back_to_per_expert(monkeypatch, generator: torch.Generator) -> None:
    qtypes = QTYPE_MIXES[0]
    x, ids, weights, routed, dense = _inputs(3, qtypes, generator)
    monkeypatch.setattr(layer_module, "has_cpu_kernel", lambda q: False)
    out = cpu_moe_layer(x, ids, weights, routed, qtypes, INTER, exact=True).double().numpy()
    reference = _float64_layer(x, ids, weights, dense)
    assert np.abs(out - reference).max() <= EXACT_TOLERANCE * np.abs(reference).max()


@pytest.mark.parametrize("drop", [True, False], ids=["missing", "duplicate"])
def test_rejects_experts_not_matching_routing(drop: bool, generator: torch.Generator) -> None:
    qtypes = QTYPE_MIXES[0]
    x, ids, weights, routed, _ = _inputs(3, qtypes, generator)
    experts = routed[1:] if drop else routed + routed[:1]
    with pytest.raises(ValueError, match="do not cover every routed"):
        cpu_moe_layer(x, ids, weights, experts, qtypes, INTER)


def test_rejects_wrong_sizes(generator: torch.Generator) -> None:
    qtypes = QTYPE_MIXES[0]
    x, ids, weights, routed, _ = _inputs(2, qtypes, generator)
    e, gate, up, down = routed[0]
    with pytest.raises(ValueError, match="contiguous uint8 bytes"):
        cpu_moe_layer(x, ids, weights, [(e, gate[:-1], up, down), *routed[1:]], qtypes, INTER)
