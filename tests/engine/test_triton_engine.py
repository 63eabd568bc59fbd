"""The whole model with the Triton kernels (run by the interpreter on the CPU) equals the
torch reference path."""

import pytest
import torch

from tests.fixtures.models import get_fixture, sample_token_ids


@pytest.mark.parametrize("arch,quant", [("olmoe", "Q4_K_M"), ("qwen3moe", "IQ4_XS"), ("gpt-oss", "MXFP4_MOE")])
def test_triton_kernels_match_reference_path(engine_for, arch, quant):
    ids = sample_token_ids(get_fixture(arch, quant), 12, seed=31)
    reference = engine_for(arch, quant, kernel_backend="torch").score(ids)
    triton = engine_for(arch, quant, kernel_backend="triton").score(ids)
    rel = float((triton - reference).norm() / reference.norm())
    assert rel < 1e-4, rel
    assert torch.equal(triton.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("quant, policy", [("Q4_K_M", "copy"), ("Q4_K_M", "auto"), ("F32", "copy")])
def test_grouped_kernel_over_cache_slots_matches_reference(engine_for, quant, policy):
    """Through an expert cache the Triton path runs one grouped FFN (kernels.moe_ffn) per
    group of slots (hits, then waves of copies); with 3 slots most layers need waves.
    F32 experts take the same grouped path as quantized ones."""
    from moestream.engine import Engine

    fixture = get_fixture("olmoe", quant)
    ids = sample_token_ids(fixture, 12, seed=32)
    reference = engine_for("olmoe", quant, kernel_backend="torch").score(ids)
    engine = Engine.from_gguf(fixture.gguf_path, kernel_backend="triton", max_cached_experts=3,
                              miss_policy=policy)
    got = engine.score(ids)
    rel = float((got - reference).norm() / reference.norm())
    assert rel < 1e-4, rel
    s = engine.stats()
    assert s["expert_misses"] == s["misses_copied"] + s["misses_on_cpu"] > 0
    if policy == "copy":
        assert s["misses_on_cpu"] == 0
    # under auto the interpreter is so slow a "device" that the misses go to the CPU side:
    # the hits' grouped kernel and the CPU rows are combined
