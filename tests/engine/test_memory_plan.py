"""One memory plan from the header, made before anything is allocated, and an engine that
allocates exactly what it says; the KV cache as one pool of tokens in a chosen dtype."""

import gguf
import pytest
import torch

from moestream.engine import Engine, SamplingParams
from moestream.engine import engine as engine_module
from moestream.engine import placement
from moestream.engine.engine_config import EngineConfig
from moestream.engine.header import ModelHeader
from moestream.engine.layers import keeps_quantized
from moestream.engine.memory_plan import plan_memory, resident_bytes, workspace_parts
from tests.fixtures.models import get_fixture, sample_token_ids


def header_of(arch: str, quant: str) -> ModelHeader:
    return ModelHeader.read(get_fixture(arch, quant).gguf_path)


@pytest.mark.parametrize("arch", ["olmoe", "qwen2moe"])
def test_engine_allocates_exactly_what_the_plan_says(arch):
    engine = Engine.from_gguf(get_fixture(arch, "Q4_K_M").gguf_path, vram_budget="24MiB", ctx_size=200,
                              max_batch=3, kernel_backend="q8", miss_policy="copy")
    plan = engine.plan
    assert plan == plan_memory(header_of(arch, "Q4_K_M"), engine.engine_config, 24 << 20)
    assert plan.used_bytes <= plan.budget_bytes == 24 << 20
    assert engine.kv.nbytes == plan.kv_bytes
    assert engine.experts.buffer.nbytes == plan.cache_bytes
    assert engine.model.resident_bytes == plan.resident_bytes
    assert engine.stats()["vram_used_bytes"] == plan.kv_bytes + plan.resident_bytes + plan.cache_bytes


def test_the_budget_is_read_before_anything_is_allocated_and_kv_counted_once(monkeypatch):
    """The old engine allocated the KV cache, then read free memory (which already lacked
    it) and subtracted the KV again. Here the budget reader stands in for mem_get_info."""
    events = []
    budget = 20 << 20

    def read_budget(device):
        events.append("budget")
        return budget

    real_kv = engine_module.KVCache

    def kv_cache(*args, **kwargs):
        events.append("kv")
        return real_kv(*args, **kwargs)

    monkeypatch.setattr(placement, "default_budget", read_budget)
    monkeypatch.setattr(engine_module, "KVCache", kv_cache)
    engine = Engine.from_gguf(get_fixture("olmoe", "Q4_K_M").gguf_path, ctx_size=128, miss_policy="copy")
    assert events == ["budget", "kv"]
    plan = engine.plan
    assert plan.budget_bytes == budget  # not budget minus the KV cache
    assert plan.resident_bytes + plan.kv_bytes + plan.workspace_bytes + plan.cache_bytes <= budget
    assert engine.kv.nbytes == plan.kv_bytes


def test_kv_is_one_pool_of_a_context_in_f16_by_default():
    fixture = get_fixture("olmoe", "Q8_0")
    engine = Engine.from_gguf(fixture.gguf_path, ctx_size=200, max_batch=8)
    cfg = engine.config
    assert engine.kv.k.dtype == torch.float16
    pool_tokens = 208  # 200 rounded up to whole 16-token blocks, shared by the 8 sequences
    assert engine.kv.num_blocks * engine.kv.block_size == pool_tokens
    assert engine.kv.nbytes == 2 * cfg.n_layers * pool_tokens * cfg.n_kv_heads * cfg.head_dim * 2
    bigger = Engine.from_gguf(fixture.gguf_path, ctx_size=200, kv_tokens=1000, kv_dtype="bf16")
    assert bigger.kv.k.dtype == torch.bfloat16
    assert bigger.kv.num_blocks * bigger.kv.block_size == 1008 and bigger.max_model_len == 200
    smaller = Engine.from_gguf(fixture.gguf_path, ctx_size=200, kv_tokens=64)
    assert smaller.max_model_len == 64  # one sequence can use the whole pool, no more


def test_a_pool_smaller_than_the_batch_preempts_and_every_request_finishes():
    """Four requests that each need most of the pool: admission waits for free blocks,
    decodes preempt the newest, and each ends with what it would produce alone."""
    fixture = get_fixture("olmoe", "Q8_0")
    engine = Engine.from_gguf(fixture.gguf_path, ctx_size=64, kv_tokens=64, max_batch=4)
    alone = Engine.from_gguf(fixture.gguf_path, ctx_size=64, max_batch=1)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = [sample_token_ids(fixture, n, seed=40 + n) for n in (30, 25, 35, 20)]
    seqs = [engine.add_request(p, params) for p in prompts]
    outputs = {s.seq_id: [] for s in seqs}
    steps = 0
    while engine.has_work():
        assert engine.kv.num_free_blocks >= 0
        for out in engine.step():
            outputs[out.seq_id].append(out.token_id)
        steps += 1
        assert steps < 2000
    for prompt, seq in zip(prompts, seqs):
        assert outputs[seq.seq_id] == [o.token_id for o in alone.generate(prompt, params)]
    assert engine.kv.usage == 0.0


def test_attention_over_an_f16_pool_computes_in_fp32():
    """A layer's attention with the context stored in f16 equals attention over the same
    f16-rounded keys and values in float64 (the only loss is the storage rounding)."""
    engine = Engine.from_gguf(get_fixture("qwen3moe", "F32").gguf_path, ctx_size=64)
    cfg, kv = engine.config, engine.kv
    table: list[int] = []
    kv.allocate(table, 20)
    k = torch.randn(20, cfg.n_kv_heads, cfg.head_dim)
    v = torch.randn(20, cfg.n_kv_heads, cfg.head_dim)
    kv.write(0, kv.index(table, 0, 20), k, v)
    q = torch.randn(1, cfg.n_heads, cfg.head_dim)
    k_ctx, v_ctx = kv.read(0, kv.index(table, 0, 20))
    got = engine.model._attend(q, k_ctx.to(q.dtype), v_ctx.to(q.dtype))
    group = cfg.n_heads // cfg.n_kv_heads
    for h in range(cfg.n_heads):
        kh, vh = k[:, h // group].half().double(), v[:, h // group].half().double()
        probs = torch.softmax(kh @ q[0, h].double() / cfg.head_dim**0.5, dim=0)
        torch.testing.assert_close(got[0, h].double(), probs @ vh, rtol=1e-5, atol=1e-6)


def test_resident_weights_stay_quantized_on_cuda_unless_dense_is_asked_for():
    cuda = torch.device("cuda")
    assert keeps_quantized(gguf.GGMLQuantizationType.Q4_K, cuda, "auto", dense=False)
    assert not keeps_quantized(gguf.GGMLQuantizationType.Q4_K, cuda, "auto", dense=True)
    header = header_of("qwen2moe", "Q4_K_M")
    reader = gguf.GGUFReader(get_fixture("qwen2moe", "Q4_K_M").gguf_path)
    matrices = [t for t in reader.tensors if len(t.shape) == 2 and "_exps" not in t.name
                and "gate_inp" not in t.name and t.name != "token_embd.weight"]
    vectors = [t for t in reader.tensors if t not in matrices and "_exps" not in t.name
               and t.name != "token_embd.weight"]
    floats = sum(int(t.n_elements) * 4 for t in vectors)  # norms, biases, routers: fp32
    assert resident_bytes(header, cuda, "auto", dense=False) == sum(int(t.n_bytes) for t in matrices) + floats
    assert resident_bytes(header, cuda, "auto", dense=True) == sum(int(t.n_elements) * 2 for t in matrices) + floats


def test_dense_weights_only_where_the_budget_has_room():
    header = header_of("olmoe", "Q4_K_M")
    config = EngineConfig(device="cuda", ctx_size=128, dense_weights=True)
    roomy = plan_memory(header, config, 1 << 30)
    assert roomy.dense_weights and roomy.fits
    quantized = plan_memory(header, EngineConfig(device="cuda", ctx_size=128), 1 << 30)
    tight_budget = quantized.min_budget_bytes  # holds the quantized weights, not the dense ones
    assert roomy.min_budget_bytes > tight_budget
    tight = plan_memory(header, config, tight_budget)
    assert tight.fits and not tight.dense_weights and tight.n_slots == 1


def test_workspace_counts_pairs_logits_cublas_and_slack_on_cuda():
    header = header_of("olmoe", "Q4_K_M")
    base = EngineConfig(device="cuda", ctx_size=128)
    cuda = workspace_parts(header, base, torch.device("cuda"), 128, dense=False)
    cpu = workspace_parts(header, EngineConfig(ctx_size=128), torch.device("cpu"), 128, dense=False)
    assert cuda["cublas"] > 0 and cuda["allocator_slack"] > 0 and "cublas" not in cpu
    ffn = header.tensor("blk.0.ffn_gate_exps.weight").dims[1]
    # every (token, expert) pair of a full prefill chunk holds its gate, up and product
    assert cuda["expert_pairs"] >= base.max_batched_tokens * header.n_experts_used * 3 * ffn * 4
    wider = workspace_parts(header, EngineConfig(device="cuda", ctx_size=128, max_batch=16),
                            torch.device("cuda"), 128, dense=False)
    assert wider["logits"] == 2 * cuda["logits"]


def test_with_cudas_kernels_resident_matrices_stay_as_stored_and_match_the_plan():
    """The triton backend (the interpreter on the CPU) takes CUDA's path: attention, shared
    expert and lm_head keep their GGUF blocks for qmatmul, as the plan counts them."""
    engine = Engine.from_gguf(get_fixture("qwen2moe", "Q4_K_M").gguf_path, ctx_size=64, kernel_backend="triton",
                              vram_budget="64MiB", miss_policy="copy")
    layer = engine.model.layers[0]
    for linear in (layer.wq, layer.wo, *layer.shared, engine.model.lm_head):
        assert linear.weight is None and linear.raw.dtype == torch.uint8
    assert engine.model.resident_bytes == engine.plan.resident_bytes


def test_a_file_without_routed_experts_is_refused_with_a_reason():
    import dataclasses

    from moestream.kernels.errors import MoestreamError

    header = header_of("olmoe", "Q4_K_M")
    dense = dataclasses.replace(header, tensors=tuple(t for t in header.tensors if not t.is_routed_expert))
    with pytest.raises(MoestreamError, match="no routed experts"):
        plan_memory(dense, EngineConfig(device="cuda"), 1 << 30)
