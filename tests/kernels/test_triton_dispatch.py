"""qmatmul: kernel choice, fallback to the torch reference, and the errors it raises."""

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import moestream.kernels.dispatch as qm
from moestream.kernels.errors import UnsupportedQuantType
from moestream.kernels.formats import BLOCK_FORMATS, row_bytes
from moestream.kernels.triton_configs import TRITON_QTYPES
from moestream.kernels.dispatch import qmatmul, use_triton
from tests.kernels.triton_helpers import activations, assert_matches, random_weight

N, K = 64, 256


@pytest.mark.parametrize("leading, kernel", [((1,), "triton_gemv"), ((4, 16), "triton_gemm")])
def test_triton_backend_picks_kernel_by_rows(leading, kernel, monkeypatch, device) -> None:
    """x [..., K] of 1 row goes to the GEMV, 64 rows to the GEMM; leading dims are kept."""
    gen = torch.Generator().manual_seed(len(leading))
    raw, weight = random_weight(Q.Q5_K, N, K, gen)
    x = activations(int(torch.tensor(leading).prod()), K, torch.float16, gen)
    calls: list[str] = []
    real = getattr(qm, kernel)
    monkeypatch.setattr(qm, kernel, lambda *a, **kw: calls.append(kernel) or real(*a, **kw))
    y = qmatmul(x.reshape(*leading, K).to(device), raw.reshape(-1).to(device), Q.Q5_K, (N, K), backend="triton")
    assert calls == [kernel] and y.shape == (*leading, N)
    assert_matches(y.reshape(-1, N), x.double().numpy() @ weight.T, torch.float16)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q4_0, Q.IQ4_NL], ids=lambda q: q.name)
def test_auto_on_cpu_uses_the_reference(qtype: Q, monkeypatch) -> None:
    """CPU tensors never launch Triton under "auto", whatever the type; results stay exact."""
    for kernel in ("triton_gemv", "triton_gemm"):
        monkeypatch.setattr(qm, kernel, lambda *a, **kw: pytest.fail("Triton launched on CPU"))
    gen = torch.Generator().manual_seed(int(qtype))
    raw, weight = random_weight(qtype, N, K, gen)
    x = activations(3, K, torch.float32, gen)
    assert_matches(qmatmul(x, raw, qtype, (N, K)), x.double().numpy() @ weight.T, torch.float32)


def test_every_block_format_runs_triton_on_cuda() -> None:
    """No type leaves the Triton path on CUDA for a whole-weight dequantize."""
    assert TRITON_QTYPES == set(BLOCK_FORMATS)
    cuda = torch.device("cuda")
    for qtype in BLOCK_FORMATS:
        assert use_triton(qtype, cuda, "auto") and use_triton(qtype, torch.device("cpu"), "triton")
        assert not use_triton(qtype, cuda, "torch") and not use_triton(qtype, torch.device("cpu"), "auto")
    with pytest.raises(UnsupportedQuantType, match="TQ1_0"):
        use_triton(Q.TQ1_0, cuda, "auto")


def _args(**change):
    args = dict(
        x=torch.zeros(2, K), qweight=torch.zeros(N * row_bytes(Q.Q4_K, K), dtype=torch.uint8),
        qtype=Q.Q4_K, shape=(N, K), backend="auto",
    )
    return {**args, **change}


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.zeros(2, K, dtype=torch.int32)), TypeError, "float16, bfloat16 or float32"),
    (dict(x=torch.zeros(2, K + 1)), ValueError, "K = 256"),
    (dict(qweight=torch.zeros(N * 144, dtype=torch.int8)), TypeError, "uint8"),
    (dict(qweight=torch.zeros(N * 144 - 1, dtype=torch.uint8)), ValueError, "needs 9216"),
    (dict(qweight=torch.zeros(N, 2 * 144, dtype=torch.uint8)[:, ::2]), ValueError, "contiguous"),
    (dict(x=torch.zeros(2, K, device="meta")), ValueError, "on cpu but the activations are on meta"),
    (dict(backend="cuda"), ValueError, "backend must be"),
    (dict(qtype=Q.TQ1_0, shape=(N, K)), UnsupportedQuantType, "TQ1_0"),
    (dict(x=torch.zeros(2, 200), shape=(N, 200)), ValueError, "not a multiple"),
])
def test_rejects_bad_arguments(change, error, match) -> None:
    with pytest.raises(error, match=match):
        qmatmul(**_args(**change))
