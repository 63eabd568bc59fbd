"""qwen35moe (Gated DeltaNet + gated attention + gated shared expert) against references
independent of our code: transformers on the tiny model, llama.cpp on the file its own
converter wrote, and llama.cpp in F32 on the quantized file's tensors decoded by gguf.quants.
Then the engine's side: prefill in chunks and token-by-token decode give the one-pass
logits, batching and preemption give each request's result alone, and every finished or
aborted sequence gives its recurrent-state slot back."""

import gguf
import pytest
import torch

from moestream.engine import SamplingParams
from moestream.engine.kv_cache import KVCache
from moestream.engine.loader import open_gguf
from moestream.engine.model import BatchInput, Segment
from moestream.engine.models import model_class
from moestream.engine.placement import expert_layers
from moestream.engine.recurrent_state import RecurrentStatePool
from moestream.kernels.errors import MoestreamError
from moestream.offload.store import HostExpertStore
from tests.engine.steps import step_logits
from tests.engine.test_forward import assert_logits_match, rel_l2
from tests.engine.test_generate import hf_greedy, run_all
from tests.fixtures.dequant_gguf import dequantized_copy
from tests.fixtures.models import get_fixture, hf_logits, llama_cpp_logits, sample_token_ids
from tests.gguf_bytes import set_byte, value_offset

ARCH = "qwen35moe"


@pytest.mark.parametrize("n_tokens", [40, 150])  # 150: three prefill chunks of the delta rule
def test_f32_matches_transformers(engine_for, n_tokens):
    fixture = get_fixture(ARCH)
    ids = sample_token_ids(fixture, n_tokens, seed=1)
    assert_logits_match(engine_for(ARCH).score(ids), hf_logits(fixture, ids))


def test_f32_matches_llama_cpp(engine_for):
    fixture = get_fixture(ARCH)
    ids = sample_token_ids(fixture, 40, seed=2)
    assert_logits_match(engine_for(ARCH).score(ids), llama_cpp_logits(fixture.gguf_path, ids))


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "IQ3_S", "IQ3_XXS"])  # IQ3_XXS: with an imatrix
def test_quantized_matches_exact_decode_and_llama_cpp(engine_for, quant):
    fixture = get_fixture(ARCH, quant)
    ids = sample_token_ids(fixture, 32, seed=3)
    ours = engine_for(ARCH, quant).score(ids)
    # llama.cpp in F32 on the tensors gguf.quants decodes: what an exact decoder computes
    assert rel_l2(ours, llama_cpp_logits(dequantized_copy(fixture.gguf_path), ids)) <= 1e-3
    # llama.cpp on the quantized file rounds activations to 8 bits: measured 3.4% (Q8_0) and
    # 4.8% (Q4_K_M) from the exact logits, with ours at 3e-7 from them; IQ3_XXS (quantized
    # with tests/fixtures/imatrix.py's importance matrix): ours 7e-5 from exact, 3.6% from llama.cpp
    assert rel_l2(ours, llama_cpp_logits(fixture.gguf_path, ids)) <= 0.06


def test_q8_kernels_land_where_llama_cpp_does(engine_for):
    """The compiled CPU kernels (int8 activations, as llama.cpp) on the DeltaNet and
    attention projections and the experts: within llama.cpp's own rounding noise."""
    fixture = get_fixture(ARCH, "Q4_K_M")
    ids = sample_token_ids(fixture, 32, seed=4)
    fast = engine_for(ARCH, "Q4_K_M", kernel_backend="q8").score(ids)
    assert rel_l2(fast, llama_cpp_logits(fixture.gguf_path, ids)) <= 0.06
    assert rel_l2(fast, llama_cpp_logits(dequantized_copy(fixture.gguf_path), ids)) <= 0.06


def test_expert_cache_is_bitwise_identical_to_resident(engine_for):
    """The MoE half through a tiny VRAM expert cache (simulated on the CPU), with and
    without prefetch, beside the DeltaNet state: the all-resident logits, bit for bit."""
    fixture = get_fixture(ARCH, "Q4_K_M")
    ids = sample_token_ids(fixture, 24, seed=21)
    resident = engine_for(ARCH, "Q4_K_M").score(ids)
    for slots, prefetch in ((4, False), (1, True)):
        cached = engine_for(ARCH, "Q4_K_M", vram_budget="1GiB", max_cached_experts=slots, prefetch=prefetch)
        assert torch.equal(cached.score(ids), resident)
        assert cached.stats()["expert_misses"] > 0
    prompts = [sample_token_ids(fixture, n, seed=30 + n) for n in (5, 17, 9)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    cached = engine_for(ARCH, "Q4_K_M", vram_budget="1GiB", max_cached_experts=2, max_batch=3)
    batched = run_all(cached, prompts, params)
    assert batched == [[o.token_id for o in engine_for(ARCH, "Q4_K_M").generate(p, params)] for p in prompts]


def test_chunked_prefill_then_decode_equals_one_forward(engine_for):
    """Prefill in two uneven chunks (one crossing the 64-token chunk of the delta rule),
    then decode token by token: each step's logits are those of one full forward."""
    engine = engine_for(ARCH)
    ids = sample_token_ids(get_fixture(ARCH), 96, seed=4)
    full = engine.score(ids)
    table, slot = [], engine.states.allocate()
    try:
        for start, end in [(0, 37), (37, 90), *((n, n + 1) for n in range(90, 96))]:
            got = step_logits(engine, ids[:end], start, table, slot)
            diff = (got - full[end - 1]).abs().max()
            assert diff <= 1e-4 * full[end - 1].abs().max(), f"token {end - 1}: {diff:.3g} off the one-pass forward"
    finally:
        engine.kv.free(table)
        engine.states.free(slot)


def test_greedy_generation_matches_transformers(engine_for):
    fixture = get_fixture(ARCH)
    prompt = sample_token_ids(fixture, 11, seed=5)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours = [o.token_id for o in engine_for(ARCH).generate(prompt, params)]
    assert ours == hf_greedy(fixture, prompt, params.max_tokens)


@pytest.mark.parametrize("options", [
    dict(max_batch=3, max_batched_tokens=16),  # chunked prefill beside batched decodes
    dict(max_batch=2, ctx_size=48),  # KV for 96 tokens: decodes preempt and recompute
], ids=["chunked", "preempting"])
def test_continuous_batching_matches_requests_alone(engine_for, options):
    fixture = get_fixture(ARCH)
    engine = engine_for(ARCH, **options)
    prompts = [sample_token_ids(fixture, n, seed=10 + n) for n in (3, 20, 9, 33, 14)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    results = run_all(engine, prompts, params)
    for prompt, got in zip(prompts, results):
        assert got == hf_greedy(fixture, prompt, params.max_tokens)
    assert engine.kv.usage == 0.0, "finished sequences must free their KV blocks"
    assert engine.states.num_free == engine.states.num_slots, "and their recurrent state slots"


def test_abort_frees_the_recurrent_state(engine_for):
    engine = engine_for(ARCH, max_batch=2)
    prompt = sample_token_ids(get_fixture(ARCH), 10, seed=6)
    seqs = [engine.add_request(prompt, SamplingParams(max_tokens=50)) for _ in range(3)]
    engine.step()
    assert engine.states.num_free == 0 and seqs[2].state_slot is None, "two admitted, one waits for a slot"
    engine.abort(seqs[0].seq_id)
    assert engine.states.num_free == 1
    engine.step()
    assert seqs[2].state_slot is not None, "the freed slot admits the waiting request"
    for seq in seqs[1:]:
        engine.abort(seq.seq_id)
    assert engine.states.num_free == 2 and engine.kv.usage == 0.0


def test_kv_cache_holds_only_the_attention_layers(engine_for):
    engine = engine_for(ARCH)
    assert engine.config.attention_layers == (1, 3)
    assert engine.kv.k.shape[0] == 2
    assert engine.states.nbytes == engine.config.linear.state_bytes_per_seq * engine.states.num_slots


def test_decodes_with_scattered_state_slots_match_requests_alone(engine_for):
    """The middle request finishes first: the others keep decoding with slots 0 and 2 (a
    gathered update instead of the in-place one on a slot run), then a newcomer takes 1."""
    fixture = get_fixture(ARCH)
    engine = engine_for(ARCH, max_batch=3)
    prompts = [sample_token_ids(fixture, n, seed=40 + n) for n in (6, 8, 5, 7)]
    lengths = (10, 2, 10, 5)
    seqs = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for p, n in zip(prompts, lengths)]
    outputs = {s.seq_id: [] for s in seqs}
    slots_seen = []
    while engine.has_work():
        slots_seen.append(sorted(s.state_slot for s in engine.scheduler.running))
        for out in engine.step():
            outputs[out.seq_id].append(out.token_id)
    assert [0, 2] in slots_seen, "the scenario must decode on non-consecutive slots"
    for prompt, n, seq in zip(prompts, lengths, seqs):
        assert outputs[seq.seq_id] == hf_greedy(fixture, prompt, n)


def test_half_precision_forward_on_the_cpu():
    """fp16 activations, as on a GPU (the DeltaNet state and recurrence stay fp32): the
    same model to within fp16 rounding."""
    fixture = get_fixture(ARCH)
    file = open_gguf(fixture.gguf_path)
    cfg = file.config
    model = model_class(cfg.arch)(file, HostExpertStore(expert_layers(file), pinned=False), torch.device("cpu"),
                                  torch.float16, "torch", progress=False)
    model.states = RecurrentStatePool(cfg.linear, 1)
    kv = KVCache(cfg.n_kv_layers, cfg.n_kv_heads, cfg.head_dim, 3, 16, torch.float16)
    ids = sample_token_ids(fixture, 40, seed=7)
    table: list[int] = []
    kv.allocate(table, len(ids))
    slots = kv.index(table, 0, len(ids))
    batch = BatchInput(torch.tensor(ids), torch.arange(len(ids)), [Segment(0, len(ids), slots, slots, 0)],
                       torch.arange(len(ids)))
    model.states.allocate()
    ours, ref = model.forward(batch, kv), hf_logits(fixture, ids)
    assert rel_l2(ours, ref) <= 5e-3  # measured 1.1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize(("key", "entry", "value", "needle"), [
    ("qwen35moe.ssm.inner_size", 0, 0x01, "qwen35moe.ssm.inner_size = 257"),  # 256 -> 257: not per v-head
    ("qwen35moe.attention.recurrent_layers", 1, 0x01, "'blk.1.attn_qkv.weight' is missing"),  # now DeltaNet
])
def test_a_header_that_disagrees_with_its_tensors_is_refused(tmp_path, key, entry, value, needle):
    """One corrupt byte in the DeltaNet metadata: refused naming the key or tensor, not loaded."""
    path = get_fixture(ARCH).gguf_path
    bad = set_byte(path, tmp_path / "bad.gguf", value_offset(gguf.GGUFReader(path), key, entry), value)
    with pytest.raises(MoestreamError) as err:
        open_gguf(bad)
    assert needle in str(err.value), str(err.value)


def test_memory_plan_holds_kv_for_attention_layers_only_and_the_recurrent_state():
    """The plan (made from the header before allocating) and what the engine allocates agree:
    K/V for the gated-attention layers alone, one DeltaNet state per batch slot."""
    from moestream.engine import Engine

    engine = Engine.from_gguf(get_fixture(ARCH).gguf_path, ctx_size=64, max_batch=3)
    cfg = engine.config
    assert 0 < cfg.n_kv_layers < cfg.n_layers
    assert engine.kv.nbytes == engine.memory.kv_bytes
    assert engine.states.nbytes == engine.memory.state_bytes == 3 * cfg.linear.state_bytes_per_seq
    assert engine.memory.fixed_bytes >= engine.memory.resident_bytes + engine.kv.nbytes + engine.states.nbytes
