"""The engine's logits against independent references: transformers, llama.cpp, and an
exact-dequant oracle (transformers carrying a quantized file's weights decoded by gguf)."""

import pytest
import torch

from tests.fixtures.models import (
    ARCHS,
    QUANTS,
    dequant_oracle_model,
    get_fixture,
    hf_logits,
    llama_cpp_logits,
    model_logits,
    sample_token_ids,
)


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """The acceptance bound: max|diff| <= 1e-3 * max|logit|, and the same argmax wherever
    the reference's top-2 margin exceeds 1e-3."""
    assert ours.shape == ref.shape
    scale = ref.abs().max()
    diff = (ours - ref).abs().max()
    assert diff <= 1e-3 * scale, f"max|diff| {diff:.3g} > 1e-3 * max|logit| {scale:.3g}"
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert decisive.sum() >= len(ref) // 2, "fixture logits are too flat to test argmax"
    assert torch.equal(ours.argmax(-1)[decisive], ref.argmax(-1)[decisive])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_matches_transformers(engine_for, arch):
    fixture = get_fixture(arch)
    ids = sample_token_ids(fixture, 40, seed=1)
    assert_logits_match(engine_for(arch).score(ids), hf_logits(fixture, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_matches_llama_cpp(engine_for, arch):
    fixture = get_fixture(arch)
    ids = sample_token_ids(fixture, 40, seed=2)
    assert_logits_match(engine_for(arch).score(ids), llama_cpp_logits(fixture.gguf_path, ids))


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_matches_oracle_and_llama_cpp(engine_for, arch, quant):
    fixture = get_fixture(arch, quant)
    ids = sample_token_ids(fixture, 32, seed=3)
    ours = engine_for(arch, quant).score(ids)
    oracle = model_logits(dequant_oracle_model(fixture), ids)
    assert rel_l2(ours, oracle) <= 1e-3
    # llama.cpp rounds activations to 8 bits in its dot products, so a router can pick
    # another expert: an exact decoder lands a few percent away from it.
    assert rel_l2(ours, llama_cpp_logits(fixture.gguf_path, ids)) <= 0.06


@pytest.mark.parametrize("arch,quant", [("olmoe", "Q4_K_M"), ("qwen2moe", "IQ3_S"), ("mixtral", "Q6_K")])
def test_q8_kernels_land_where_llama_cpp_does(engine_for, arch, quant):
    """The compiled CPU kernels round activations to int8 blocks as llama.cpp does: their
    logits sit within the same few percent of llama.cpp's as the exact path's do."""
    fixture = get_fixture(arch, quant)
    ids = sample_token_ids(fixture, 32, seed=4)
    fast = engine_for(arch, quant, kernel_backend="q8").score(ids)
    assert rel_l2(fast, llama_cpp_logits(fixture.gguf_path, ids)) <= 0.06
    assert rel_l2(fast, model_logits(dequant_oracle_model(fixture), ids)) <= 0.06
