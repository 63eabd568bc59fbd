"""A CPU-only install has no triton (only CUDA builds of torch bring it): everything but the
Triton backend must import and run without it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.fixtures.models import get_fixture

_WITHOUT_TRITON = "import sys; sys.modules['triton'] = None  # `import triton` now raises ImportError\n"


def run_without_triton(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_TRITON + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_cpu_generation_runs_and_the_triton_backend_says_what_to_install():
    fixture = get_fixture("olmoe", "Q4_K_M")
    done = run_without_triton(f"""
        import torch
        from gguf import GGMLQuantizationType as Q
        from moestream.kernels import MoestreamError, qmatmul, random_blocks
        from moestream.kernels.dequant import dequantize
        from moestream.server.cli import main

        assert main(["--log-level", "ERROR", "generate", "-m", {str(fixture.gguf_path)!r}, "-p", "hi", "-n", "3",
                     "--kernels", "auto"]) == 0
        w = random_blocks(Q.Q8_0, 4 * 64 // 32, torch.Generator().manual_seed(0)).reshape(-1)
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
        ref = x @ dequantize(w, Q.Q8_0, (4, 64)).T
        # random f16 block scales make outputs of any size: the summation order's rounding
        # is relative to the largest one
        torch.testing.assert_close(qmatmul(x, w, Q.Q8_0, (4, 64), backend="auto"), ref,
                                   rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        try:
            qmatmul(x, w, Q.Q8_0, (4, 64), backend="triton")
        except MoestreamError as exc:
            print("refused:", exc)
        assert "triton" not in sys.modules or sys.modules["triton"] is None
    """)
    assert done.returncode == 0, done.stderr
    assert "refused: the triton kernels need the triton package" in done.stdout, done.stdout
