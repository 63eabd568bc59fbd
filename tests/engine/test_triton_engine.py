"""The whole model with the Triton kernels (run by the interpreter on the CPU) equals the
torch reference path."""

import pytest
import torch

from tests.fixtures.models import get_fixture, sample_token_ids


@pytest.mark.parametrize("arch,quant", [("olmoe", "Q4_K_M"), ("qwen3moe", "IQ4_XS")])
def test_triton_kernels_match_reference_path(engine_for, arch, quant):
    ids = sample_token_ids(get_fixture(arch, quant), 12, seed=31)
    reference = engine_for(arch, quant, kernel_backend="torch").score(ids)
    triton = engine_for(arch, quant, kernel_backend="triton").score(ids)
    rel = float((triton - reference).norm() / reference.norm())
    assert rel < 1e-4, rel
    assert torch.equal(triton.argmax(-1), reference.argmax(-1))
