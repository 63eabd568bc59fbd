"""MOESTREAM_CPU_ISA: the AVX2 kernel path forced on this host, against the native path and
the torch reference (kernels.dequantize + F.linear).

The two paths sum in different orders (AVX-512: 16 fp32 lanes per block in registers; AVX2:
blocks decoded to memory, 8 lanes), so they agree to fp32 rounding, not bitwise. The int8
route quantises the activations identically on both (the same scalar code), so there too
they differ only by fp32 summation order, well inside llama.cpp's own rounding bound, which
each must also meet against the reference.
"""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

import moestream.kernels.cpu.build as build
from moestream.kernels import dequantize
from moestream.kernels.errors import MoestreamError
from tests.kernels.test_cpu_qmatmul import (EXACT_TOLERANCE, KERNEL_TYPES, _activations,
                                            _assert_within_int8_error, _weights)

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="the AVX2 / AVX-512 paths exist only on x86")


@pytest.fixture(scope="module")
def builds() -> dict:
    """The native build and the forced-AVX2 build (compiled once for the whole module)."""
    native = build.load_extension()
    assert native is not None, "the C++ CPU kernels failed to build (see the log)"
    return {"native": native, "avx2": build.compile_extension(without=build.ISA_FLAGS["avx2"])}


def _matmul(ext, x: torch.Tensor, raw: torch.Tensor, qtype: Q, rows: int, exact: bool) -> torch.Tensor:
    y = torch.empty(x.shape[0], rows)
    ext.qmatmul(x.data_ptr(), raw.data_ptr(), int(qtype), x.shape[0], rows, x.shape[1], y.data_ptr(), exact)
    return y


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_avx2_build_is_the_avx2_path(builds: dict) -> None:
    assert builds["avx2"].isa == "avx2"
    assert builds["avx2"].supported_types() == builds["native"].supported_types()


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_avx2_matches_native_and_reference(builds: dict, qtype: Q, m: int) -> None:
    gen = torch.Generator().manual_seed(1000 * int(qtype) + m)
    rows, cols = 37, 512
    raw, dense = _weights(qtype, rows, cols, gen)
    x = _activations(m, cols, gen)
    reference = F.linear(x, dequantize(raw, qtype, (rows, cols)))
    exact = {name: _matmul(ext, x, raw, qtype, rows, exact=True) for name, ext in builds.items()}
    int8 = {name: _matmul(ext, x, raw, qtype, rows, exact=False) for name, ext in builds.items()}
    for name in builds:
        assert _relative(exact[name], reference) <= EXACT_TOLERANCE, f"{name} exact vs dequantize + F.linear"
        _assert_within_int8_error(int8[name], x, dense, qtype, seed=gen.initial_seed())
    assert _relative(exact["avx2"], exact["native"]) <= EXACT_TOLERANCE
    assert _relative(int8["avx2"], int8["native"]) <= EXACT_TOLERANCE  # same int8 activations


def test_unknown_isa_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(build.ISA_ENV, "avx9000")
    with pytest.raises(MoestreamError, match="native, avx2, portable"):
        build.requested_isa()


def test_environment_selects_the_avx2_path(builds: dict) -> None:
    """A fresh process with MOESTREAM_CPU_ISA=avx2 loads the AVX2 build and says so."""
    code = ("import logging; logging.basicConfig(level=logging.INFO);"
            "from moestream.kernels.cpu.build import load_extension; print(load_extension().isa)")
    env = {**os.environ, build.ISA_ENV: "avx2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "avx2"
    assert "CPU quantized kernels loaded (avx2)" in done.stderr


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_avx2_register_path_over_several_weight_tiles(builds: dict, qtype: Q) -> None:
    """More weight rows than one 256 KiB tile and 6 activation rows (passes of 4 + 2): the
    AVX2 register path's tiling and row passes, both routes, against the native build."""
    gen = torch.Generator().manual_seed(int(qtype))
    rows, cols, m = 2100, 256, 6  # 2100 rows x 1 block > 256 KiB of blocks for every type here
    raw, dense = _weights(qtype, rows, cols, gen)
    x = _activations(m, cols, gen)
    for exact in (False, True):
        avx2 = _matmul(builds["avx2"], x, raw, qtype, rows, exact)
        assert _relative(avx2, _matmul(builds["native"], x, raw, qtype, rows, exact)) <= EXACT_TOLERANCE
    reference = torch.from_numpy(x.double().numpy() @ dense.T)
    assert _relative(_matmul(builds["avx2"], x, raw, qtype, rows, True), reference) <= EXACT_TOLERANCE
    _assert_within_int8_error(_matmul(builds["avx2"], x, raw, qtype, rows, False), x, dense, qtype, seed=int(qtype))


@pytest.mark.parametrize("ctx", [1, 13, 150])  # tails of the 4-slot and 8-lane loops, and a long run
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_avx2_attention_matches_float64(builds: dict, ctx: int, cache_dtype: torch.dtype) -> None:
    """The AVX2 build's vector attention (8 lanes, its own exp) against float64 SDPA."""
    g = torch.Generator().manual_seed(ctx)
    H, KV, hd = 16, 4, 128
    k = torch.randn(ctx, KV, hd, generator=g).to(cache_dtype)
    v = torch.randn(ctx, KV, hd, generator=g).to(cache_dtype)
    q = torch.randn(1, H, hd, generator=g) * 3
    kd, vd = (t.double().repeat_interleave(H // KV, dim=1).transpose(0, 1) for t in (k, v))  # [H, ctx, hd]
    scores = (q.double().transpose(0, 1) @ kd.transpose(1, 2)) * hd**-0.5  # [H, 1, ctx]
    want = (torch.softmax(scores, -1) @ vd).transpose(0, 1)  # [1, H, hd]
    for name, ext in builds.items():
        out = torch.empty(1, H, hd)
        if cache_dtype == torch.float32:
            ext.attend_one(q.data_ptr(), H, hd, k.data_ptr(), v.data_ptr(), ctx, KV, KV * hd, hd**-0.5,
                           out.data_ptr())
        else:  # the decode entry writes slot ctx - 1 first: give it that slot's own values
            qc, kn, vn = q.clone(), k[-1:].float().clone(), v[-1:].float().clone()
            cos, sin = torch.ones(2), torch.zeros(2)  # rope of 2 dims at angle 0: identity
            ext.decode_attention(qc.data_ptr(), kn.data_ptr(), vn.data_ptr(), H, KV, hd, 0, 0, False, 0.0,
                                 cos.data_ptr(), sin.data_ptr(), 2, False, k.data_ptr(), v.data_ptr(), ctx, KV * hd,
                                 True, hd**-0.5, out.data_ptr())
        assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max(), name
