"""CPU kernels (kernels.cpu) against gguf's numpy dequantizers and float64 matmuls.

The integer route quantises each activation row to int8 per block (scale max|x| / 127, per
256 elements for K/IQ types, per 32 for the legacy types), exactly like llama.cpp's q8_K /
q8_0 dot products. Rounding moves each x by at most half a scale step, so every output obeys

    |y - y_ref| <= sum_k |W[n, k]| * scale(block of k) / 2      (+ fp32 accumulation)

which the tests check element-wise (a wrong decode or a lost block breaks it by orders of
magnitude). Rounding errors are uniform in +-scale/2 and independent, so the error is also
predicted in the mean: rms over outputs of sqrt(sum_k W[n, k]^2 scale^2 / 12). With 16 or
more activation rows (independent roundings) the tests require the measured rms error within
2x of that prediction: a biased kernel (a min or shift term slightly off) fails it even where
it stays inside the hard bound. For Gaussian activations this is a relative error of about
0.7% (scale ~ 2.9 sigma / 127).

The exact route (exact=True) keeps activations in float32 and accumulates in fp32: it must
match the float64 product on gguf's dequantized weights to fp32 rounding (1e-5 of the
output scale) and agree with kernels.dequantize + F.linear just as closely.
"""

import logging
import platform
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf import quants

import moestream.kernels.cpu.build as build
import moestream.kernels.cpu.qmatmul as cpu_module
from moestream.kernels import BLOCK_FORMATS, dequantize, random_blocks
from moestream.kernels.cpu import cpu_dequantize, cpu_expert_ffn, cpu_qmatmul, has_cpu_kernel

SUPER_BLOCK_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S,
                     Q.IQ4_XS]
LEGACY_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.MXFP4]
KERNEL_TYPES = SUPER_BLOCK_TYPES + LEGACY_TYPES
RMS_TOLERANCE = 2.0  # measured rms error / predicted, over >= 16 independent activation rows
EXACT_TOLERANCE = 1e-5  # max |error| / max |y|: fp32 rounding over K = 512 is ~1e-7


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    """Every test here checks the compiled kernels: fail loudly if they did not build."""
    assert build.load_extension() is not None, "the C++ CPU kernels failed to build (see the log)"


@pytest.fixture
def generator() -> torch.Generator:
    gen = torch.Generator()
    gen.seed()
    return gen


def _weights(qtype: Q, rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Random GGUF bytes [rows, row_bytes] and their gguf dequantization as float64."""
    raw = random_blocks(qtype, rows * cols // BLOCK_FORMATS[qtype].block_size, gen).reshape(rows, -1)
    dense = quants.dequantize(raw.numpy(), qtype).astype(np.float64)
    assert np.isfinite(dense).all()
    return raw, dense


def _activations(m: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, cols, generator=gen)
    x[0, : cols // 2] = 0.0  # an all-zero block must give zero, not NaN
    return x


def _steps(x: torch.Tensor, block: int) -> np.ndarray:
    """The int8 step (max|x| / 127 of its block) of every activation element, [M, K]."""
    xb = x.double().numpy().reshape(x.shape[0], -1, block)
    step = np.abs(xb).max(axis=-1, keepdims=True) / 127
    return np.broadcast_to(step, xb.shape).reshape(x.shape)


def _assert_within_int8_error(y: torch.Tensor, x: torch.Tensor, dense: np.ndarray, qtype: Q, seed: int) -> None:
    xd = x.double().numpy()
    error = np.abs(y.double().numpy() - xd @ dense.T)
    step = _steps(x, 256 if qtype in SUPER_BLOCK_TYPES else 32)
    bound = (step / 2) @ np.abs(dense).T * (1 + 1e-3) + 1e-5 * (np.abs(xd) @ np.abs(dense).T)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert (error <= bound).all(), f"seed {seed}: error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    if x.shape[0] >= 16:  # fewer rows share too few roundings for a mean to settle
        predicted_rms = np.sqrt(((step**2 / 12) @ (dense**2).T).mean())
        rms = np.sqrt((error**2).mean())
        assert rms <= RMS_TOLERANCE * predicted_rms, f"seed {seed}: rms error {rms:.3g}, predicted {predicted_rms:.3g}"


def test_kernel_types_listed() -> None:
    assert all(has_cpu_kernel(q) for q in KERNEL_TYPES)
    assert not has_cpu_kernel(Q.IQ1_S) and not has_cpu_kernel(Q.F16)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf(qtype: Q, generator: torch.Generator) -> None:
    raw, dense = _weights(qtype, 7, 512, generator)
    got = cpu_dequantize(raw, qtype, (7, 512)).double().numpy()
    np.testing.assert_allclose(got, dense, rtol=1e-6, atol=1e-6 * np.abs(dense).max(),
                               err_msg=f"seed {generator.initial_seed()}")


# 8: one pass of eight lanes on AVX-512 (kernels/cpu/csrc/lanes.h); 11, 23: sixteen-lane passes
# with lanes left empty, and two unequal passes.
@pytest.mark.parametrize("m", [1, 3, 8, 11, 16, 23, 64])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_qmatmul_within_int8_error(qtype: Q, m: int, generator: torch.Generator) -> None:
    rows, cols = 37, 512
    raw, dense = _weights(qtype, rows, cols, generator)
    x = _activations(m, cols, generator)
    y = cpu_qmatmul(x, raw, qtype, (rows, cols))
    assert y.shape == (m, rows) and y.dtype == torch.float32
    assert (y[0] != 0).any() and torch.isfinite(y).all()
    _assert_within_int8_error(y, x, dense, qtype, generator.initial_seed())


def _assert_exact(y: torch.Tensor, reference: np.ndarray, what: str) -> None:
    scale = np.abs(reference).max()
    worst = np.abs(y.double().numpy() - reference).max() / scale
    assert worst <= EXACT_TOLERANCE, f"{what}: max error {worst:.3g} of the output scale"


@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_exact_qmatmul(qtype: Q, m: int, generator: torch.Generator) -> None:
    rows, cols = 37, 512
    raw, dense = _weights(qtype, rows, cols, generator)
    x = _activations(m, cols, generator)
    y = cpu_qmatmul(x, raw, qtype, (rows, cols), exact=True)
    assert y.shape == (m, rows) and y.dtype == torch.float32
    seed = generator.initial_seed()
    _assert_exact(y, x.double().numpy() @ dense.T, f"seed {seed}, float64 on gguf weights")
    torch_route = F.linear(x, dequantize(raw, qtype, (rows, cols))).double().numpy()
    _assert_exact(y, torch_route, f"seed {seed}, dequantize + F.linear")


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda q: q.name)
def test_prefill_chunk(qtype: Q, generator: torch.Generator) -> None:
    """M = 256 rows (a prefill chunk) and, for Q8_0, K that is not a multiple of 256."""
    rows, cols = 129, 256 if qtype == Q.Q4_K else 96
    raw, dense = _weights(qtype, rows, cols, generator)
    x = _activations(256, cols, generator)
    _assert_within_int8_error(cpu_qmatmul(x, raw, qtype, (rows, cols)), x, dense, qtype, generator.initial_seed())


OLDER_CPUS = {"avx2": build.WITHOUT_AVX512, "plain-cpp": build.WITHOUT_AVX2}


@pytest.fixture(scope="module")
def older_cpu_builds() -> dict:
    """Both older-CPU builds, compiled side by side (one compiler per core: half the wait)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the flags that select the older x86 code paths exist only on x86")
    with ThreadPoolExecutor(len(OLDER_CPUS)) as pool:
        futures = {name: pool.submit(build.compile_extension, without=flags) for name, flags in OLDER_CPUS.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(params=list(OLDER_CPUS))
def older_cpu_build(older_cpu_builds: dict, request):
    """The kernels as CPUs without AVX-512 (AVX2 path) or without AVX2 (plain C++) run them."""
    return older_cpu_builds[request.param]


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_older_cpu_paths(older_cpu_build, qtype: Q, generator: torch.Generator) -> None:
    rows, cols, m = 37, 512, 16
    raw, dense = _weights(qtype, rows, cols, generator)
    x = _activations(m, cols, generator)
    y, y_exact, w = torch.empty(m, rows), torch.empty(m, rows), torch.empty(rows, cols)
    older_cpu_build.qmatmul(x.data_ptr(), raw.data_ptr(), int(qtype), m, rows, cols, y.data_ptr(), False)
    older_cpu_build.qmatmul(x.data_ptr(), raw.data_ptr(), int(qtype), m, rows, cols, y_exact.data_ptr(), True)
    older_cpu_build.dequantize(raw.data_ptr(), int(qtype), rows, cols, w.data_ptr())
    _assert_within_int8_error(y, x, dense, qtype, generator.initial_seed())
    _assert_exact(y_exact, x.double().numpy() @ dense.T, f"seed {generator.initial_seed()}, exact route")
    np.testing.assert_allclose(w.double().numpy(), dense, rtol=1e-6, atol=1e-6 * np.abs(dense).max())


@pytest.mark.parametrize("m", [5, 20])
@pytest.mark.parametrize("exact", [False, True], ids=["int8", "exact"])
def test_independent_of_thread_count(exact: bool, m: int, generator: torch.Generator) -> None:
    """Rows split across threads (and the gate/up job boundary) compute the same numbers."""
    raw, _ = _weights(Q.Q4_K, 301, 512, generator)
    x = _activations(m, 512, generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_qmatmul(x, raw, Q.Q4_K, (301, 512), exact)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(cpu_qmatmul(x, raw, Q.Q4_K, (301, 512), exact), single)


@pytest.mark.parametrize("m", [8, 11, 40])
@pytest.mark.parametrize("qtype", SUPER_BLOCK_TYPES, ids=lambda q: q.name)
def test_rows_together_sum_the_same_integers(qtype: Q, m: int, generator: torch.Generator) -> None:
    """Activation rows multiplied together (in vector lanes on AVX-512) and one at a time (one
    row: the weights' own lanes) sum the same integers per block; only the float sums over
    blocks may round differently."""
    rows, cols = 45, 1024
    raw, _ = _weights(qtype, rows, cols, generator)
    x = _activations(m, cols, generator)
    together = cpu_qmatmul(x, raw, qtype, (rows, cols)).double()
    alone = torch.cat([cpu_qmatmul(x[i : i + 1], raw, qtype, (rows, cols)) for i in range(m)]).double()
    worst = ((together - alone).abs().max() / alone.abs().max()).item()
    assert worst <= 1e-5, f"seed {generator.initial_seed()}: rows together differ by {worst:.3g} of the scale"


def _silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


@pytest.mark.parametrize("qtypes", [(Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.IQ3_S, Q.Q8_0, Q.IQ2_XXS)],
                         ids=lambda qs: "-".join(q.name for q in qs))
@pytest.mark.parametrize("tokens", [1, 5])
def test_expert_ffn(qtypes: tuple[Q, Q, Q], tokens: int, generator: torch.Generator) -> None:
    d_model, inter = 256, 512
    gate, gate_w = _weights(qtypes[0], inter, d_model, generator)
    up, up_w = _weights(qtypes[1], inter, d_model, generator)
    down, down_w = _weights(qtypes[2], d_model, inter, generator)
    x = torch.randn(tokens, d_model, generator=generator)
    x *= 2 / (x.double().numpy() @ gate_w.T).std()  # gate pre-activations ~ N(0, 2): silu bends
    xd = x.double().numpy()
    reference = (_silu(xd @ gate_w.T) * (xd @ up_w.T)) @ down_w.T

    y = cpu_expert_ffn(x, gate, up, down, qtypes, inter)

    assert y.shape == (tokens, d_model) and y.dtype == torch.float32
    relative = np.linalg.norm(y.double().numpy() - reference) / np.linalg.norm(reference)
    # Two int8 roundings: x (~0.7%, see the module doc), then the hidden silu(g) * u, a product
    # of two Gaussians whose block maxima reach ~10 sigma: step ~ 10 / 127, rms ~2.3%. llama.cpp
    # quantises the same hidden row (q8_K) for its down projection. One token: 5.8% worst of
    # 150 seeds (few roundings, wide spread).
    assert relative <= 8e-2, f"seed {generator.initial_seed()}: relative error {relative:.3g}"

    exact = cpu_expert_ffn(x, gate, up, down, qtypes, inter, exact=True)
    _assert_exact(exact, reference, f"seed {generator.initial_seed()}, exact expert FFN")


def test_type_without_kernel_uses_reference(generator: torch.Generator) -> None:
    raw, dense = _weights(Q.IQ1_S, 9, 256, generator)
    x = torch.randn(2, 256, generator=generator)
    y = cpu_qmatmul(x, raw, Q.IQ1_S, (9, 256))
    np.testing.assert_allclose(y.double().numpy(), x.double().numpy() @ dense.T, rtol=1e-4, atol=1e-4)


def test_without_compiler_falls_back_with_notice(monkeypatch, caplog, generator: torch.Generator) -> None:
    def no_compiler():
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(build, "compile_extension", no_compiler)
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.load_extension.__wrapped__() is None
    assert "falling back to dequantize + F.linear" in caplog.text

    monkeypatch.setattr(cpu_module, "_kernel_types", frozenset)  # as if the build had failed
    raw, dense = _weights(Q.Q4_K, 9, 256, generator)
    x = torch.randn(3, 256, generator=generator)
    assert not has_cpu_kernel(Q.Q4_K)
    y = cpu_qmatmul(x, raw, Q.Q4_K, (9, 256))
    np.testing.assert_allclose(y.double().numpy(), x.double().numpy() @ dense.T, rtol=1e-4, atol=1e-4)


def test_rejects_wrong_sizes(generator: torch.Generator) -> None:
    raw, _ = _weights(Q.Q4_K, 4, 256, generator)
    with pytest.raises(ValueError, match="needs 576 uint8 bytes"):
        cpu_qmatmul(torch.randn(1, 256), raw[:, :-1], Q.Q4_K, (4, 256))
    with pytest.raises(ValueError, match=r"\[M, 256\]"):
        cpu_qmatmul(torch.randn(1, 255), raw, Q.Q4_K, (4, 256))


@pytest.mark.parametrize("exact", [False, True], ids=["int8", "exact"])
def test_qmatmul_many_is_bitwise_one_call_per_matrix(exact: bool, generator: torch.Generator) -> None:
    """q/k/v-style calls of mixed block families in one region give each matrix's own numbers."""
    from moestream.kernels.cpu import cpu_qmatmul_many

    cols = 512
    mats = [(_weights(q, rows, cols, generator)[0], q, (rows, cols))
            for q, rows in ((Q.Q4_K, 67), (Q.Q6_K, 13), (Q.Q8_0, 40), (Q.IQ4_XS, 5))]
    x = _activations(3, cols, generator)
    together = cpu_qmatmul_many(x, mats, exact)
    for (raw, qtype, shape), y in zip(mats, together):
        assert torch.equal(y, cpu_qmatmul(x, raw, qtype, shape, exact)), qtype.name
    with pytest.raises(ValueError, match="K = 512"):
        cpu_qmatmul_many(x, [mats[0], (mats[1][0], Q.Q6_K, (26, 256))])
