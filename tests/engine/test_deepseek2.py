"""deepseek2 (multi-head latent attention) against references independent of our code:
transformers' DeepseekV2 on the tiny models (with a q LoRA rank and YaRN; without, as
V2-Lite) and its Glm4MoeLite (GLM-4.7-Flash: sigmoid routing with a correction bias,
normalised, scaled; a NextN block to skip), written to GGUF by llama.cpp's own converter
and quantized by llama.cpp; llama.cpp on the same files. Then the engine's side: the KV cache holds only the latent and the rope
part, prefill in chunks and token-by-token decode give the one-pass logits, and batched
requests get what each gets alone."""

import gguf
import pytest
import torch

from moestream.engine import Engine, SamplingParams
from moestream.engine.loader import open_gguf
from moestream.kernels.errors import MoestreamError
from tests.engine.steps import step_logits
from tests.engine.test_forward import assert_logits_match, rel_l2
from tests.engine.test_generate import hf_greedy, run_all
from tests.fixtures.dequant_gguf import dequantized_copy
from tests.fixtures.models import get_fixture, hf_logits, hf_model, llama_cpp_logits, sample_token_ids

# q LoRA + YaRN; attn_q without LoRA (26 layers); GLM-4.7-Flash
ARCHS = ("deepseek2", "deepseek2-lite", "glm4moe-lite")
# The references keep K and V in fp32; the engine's default f16 KV cache rounds the latents,
# which over the lite model's 26 layers can flip a near-tied routing choice (it did on a
# draw of weights with larger experts). Comparisons with them use an fp32 KV cache.
F32_KV = {"kv_dtype": "f32"}


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_matches_transformers(engine_for, arch):
    """100 positions: past the YaRN fixture's original context of 64."""
    fixture = get_fixture(arch)
    ids = sample_token_ids(fixture, 100, seed=1)
    ours, ref = engine_for(arch, **F32_KV).score(ids), hf_logits(fixture, ids)
    assert_logits_match(ours, ref)
    assert rel_l2(ours, ref) <= 1e-3


@pytest.mark.parametrize("arch", ["deepseek2", "glm4moe-lite"])
def test_f32_matches_llama_cpp(engine_for, arch):
    fixture = get_fixture(arch)
    ids = sample_token_ids(fixture, 40, seed=2)
    assert rel_l2(engine_for(arch, **F32_KV).score(ids), llama_cpp_logits(fixture.gguf_path, ids)) <= 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_matches_exact_decode_and_llama_cpp(engine_for, arch, quant):
    fixture = get_fixture(arch, quant)
    # 26 layers x 4 experts make near-ties in routing likely: with 32 tokens, token 19 of
    # the Q4_K_M lite model has its 2nd and 3rd expert of layer 7 7e-6 apart in probability,
    # and float rounding alone (compiled kernel vs torch reference) picks either.
    ids = sample_token_ids(fixture, 16 if arch == "deepseek2-lite" else 32, seed=3)
    ours = engine_for(arch, quant, **F32_KV).score(ids)
    # llama.cpp in F32 on the tensors gguf.quants decodes: what an exact decoder computes
    exact = llama_cpp_logits(dequantized_copy(fixture.gguf_path), ids)
    assert rel_l2(ours, exact) <= 1e-3
    # llama.cpp on the quantized file rounds activations to 8 bits: its distance from the
    # exact logits is its noise, and ours stand no further from it than the exact logits do.
    # Measured: 1.1% / 1.7% (deepseek2 Q8_0 / Q4_K_M), 1.1% / 5.2% (glm4moe-lite), 3.4% /
    # 8.3% over the lite model's 26 layers; ours stand 3-8e-7 from the exact logits.
    theirs = llama_cpp_logits(fixture.gguf_path, ids)
    noise = rel_l2(theirs, exact)
    assert noise <= 0.1
    assert rel_l2(ours, theirs) <= noise + 2e-3


def test_yarn_frequencies_and_scale_match_transformers(engine_for):
    """DeepSeek-V2-Lite's YaRN (factor 40) over the fixture's short original context: the
    frequencies transformers' yarn rope computes, cos and sin unscaled (mscale equals
    mscale_all_dim), and the attention scale its DeepseekV2 attention uses (mscale squared)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = hf_model(get_fixture("deepseek2"))
    theirs, cos_sin_scale = ROPE_INIT_FUNCTIONS["yarn"](hf.config)
    model = engine_for("deepseek2").model
    torch.testing.assert_close(model.rope.inv_freq.float(), theirs.float(), rtol=1e-6, atol=0)
    assert cos_sin_scale == pytest.approx(1.0) and model.rope.mscale == pytest.approx(1.0)
    assert model.attn_scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-6)
    assert model.attn_scale > 1.5 * hf.config.qk_head_dim**-0.5  # the mscale is there to check


def test_expert_cache_is_bitwise_identical_to_resident(engine_for):
    """The MoE layers through a tiny VRAM expert cache (simulated on the CPU), with and
    without prefetch past the leading dense layer: the all-resident logits, bit for bit."""
    fixture = get_fixture("glm4moe-lite", "Q4_K_M")
    ids = sample_token_ids(fixture, 24, seed=21)
    resident = engine_for("glm4moe-lite", "Q4_K_M").score(ids)
    for slots, prefetch in ((4, False), (1, True)):
        cached = engine_for("glm4moe-lite", "Q4_K_M", vram_budget="1GiB", max_cached_experts=slots,
                            prefetch=prefetch)
        assert torch.equal(cached.score(ids), resident)
        assert cached.stats()["expert_misses"] > 0


def test_glm_flash_skips_its_nextn_block_and_routes_by_sigmoid(engine_for):
    config = engine_for("glm4moe-lite").config
    assert (config.n_layers, config.n_nextn_layers, config.n_dense_layers) == (3, 1, 1)
    assert config.router.gating.name == "SIGMOID" and config.router.norm_topk
    assert config.router.weights_scale == pytest.approx(1.8)


def test_kv_cache_keeps_only_the_latent_and_the_rope_part(engine_for):
    engine = engine_for("deepseek2")
    mla = engine.config.mla
    assert engine.kv.k.shape[2:] == (1, mla.kv_lora_rank + mla.qk_rope_dim)
    assert engine.kv.v.shape[-1] == 0
    n_layers, n_tokens = engine.kv.k.shape[:2]
    # 288 values per token and layer; per-head K and V would be 4 heads x (96 + 64) = 640
    assert engine.kv.nbytes == n_layers * n_tokens * (256 + 32) * engine.kv.k.element_size()


def test_memory_plan_sizes_the_kv_by_the_latent():
    engine = Engine.from_gguf(get_fixture("deepseek2").gguf_path, ctx_size=64, max_batch=2)
    mla = engine.config.mla
    assert engine.kv.nbytes == engine.memory.kv_bytes == 3 * 64 * mla.kv_width * engine.kv.k.element_size()


def test_chunked_prefill_then_decode_equals_one_forward(engine_for):
    """Prefill in two chunks, then decode in latent space token by token: each step's logits
    are those of one full forward, and of transformers'."""
    engine = engine_for("deepseek2")
    fixture = get_fixture("deepseek2")
    ids = sample_token_ids(fixture, 80, seed=4)
    full, ref = engine.score(ids), hf_logits(fixture, ids)
    table: list[int] = []
    try:
        for start, end in [(0, 37), (37, 70), *((n, n + 1) for n in range(70, 80))]:
            got = step_logits(engine, ids[:end], start, table)
            diff = (got - full[end - 1]).abs().max()
            assert diff <= 1e-4 * full[end - 1].abs().max(), f"token {end - 1}: {diff:.3g} off the one-pass forward"
            assert rel_l2(got[None], ref[end - 1][None]) <= 1e-3
    finally:
        engine.kv.free(table)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_transformers(engine_for, arch):
    fixture = get_fixture(arch)
    prompt = sample_token_ids(fixture, 11, seed=5)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours = [o.token_id for o in engine_for(arch, **F32_KV).generate(prompt, params)]
    assert ours == hf_greedy(fixture, prompt, params.max_tokens)


@pytest.mark.parametrize("options", [
    dict(max_batch=3, max_batched_tokens=16),  # chunked prefill beside batched decodes
    dict(max_batch=2, ctx_size=48),  # KV for 96 tokens: decodes preempt and recompute
], ids=["chunked", "preempting"])
def test_continuous_batching_matches_requests_alone(engine_for, options):
    fixture = get_fixture("deepseek2", "Q4_K_M")
    engine = engine_for("deepseek2", "Q4_K_M", **options)
    alone = engine_for("deepseek2", "Q4_K_M")
    prompts = [sample_token_ids(fixture, n, seed=10 + n) for n in (3, 20, 9, 33, 14)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    results = run_all(engine, prompts, params)
    for prompt, got in zip(prompts, results):
        assert got == [o.token_id for o in alone.generate(prompt, params)]
    assert engine.kv.usage == 0.0, "finished sequences must free their KV blocks"


def _legacy_copy(src, dst) -> None:
    """`src` as older llama.cpp converters wrote deepseek2: one attn_kv_b per layer where the
    current layout has attn_k_b and attn_v_b."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "deepseek2")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    for name in [n for n in tensors if n.endswith("attn_k_b.weight")]:
        k_b, v_b = tensors.pop(name), tensors.pop(name.replace("k_b", "v_b"))  # [H, rank, nope], [H, v, rank]
        kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [H, nope + v, rank]
        tensors[name.replace("k_b", "kv_b")] = kv_b.reshape(-1, kv_b.shape[-1])
    for name, t in tensors.items():
        writer.add_tensor(name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_file_in_the_old_kv_b_layout_is_refused_saying_to_reconvert(tmp_path):
    legacy = tmp_path / "legacy.gguf"
    _legacy_copy(get_fixture("deepseek2").gguf_path, legacy)
    with pytest.raises(MoestreamError, match="old attn_kv_b layout.*re-convert"):
        open_gguf(legacy)

