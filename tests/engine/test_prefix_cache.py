"""The prompt prefix cache in the engine: a prompt sharing full blocks with an earlier one
prefills only the rest and gets the logits the engine computes without the cache; the
count of cached tokens; eviction under a small KV pool; aborts that leak nothing; hybrid
models keep it off."""

import pytest
import torch

from moestream.engine import SamplingParams
from tests.fixtures.models import get_fixture, sample_token_ids

BLOCK = 16
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def run(engine, prompt: list[int], params: SamplingParams = GREEDY):
    """(tokens, the logits each step sampled from, the sequence) of one request alone."""
    rows: list[torch.Tensor] = []
    forward = engine.model.forward

    def capture(batch, kv):
        logits = forward(batch, kv)
        rows.append(logits.detach().clone())
        return logits

    engine.model.forward = capture
    try:
        seq = engine.add_request(prompt, params)
        tokens = []
        while not seq.is_finished:
            tokens += [o.token_id for o in engine.step() if o.seq_id == seq.seq_id]
    finally:
        engine.model.forward = forward
    return tokens, torch.cat(rows), seq


def prompts(n_shared: int, tails: tuple[int, int]) -> tuple[list[int], list[int]]:
    fixture = get_fixture("olmoe")
    shared = sample_token_ids(fixture, n_shared, seed=21)
    return (shared + sample_token_ids(fixture, tails[0], seed=22),
            shared + sample_token_ids(fixture, tails[1], seed=23))


def test_a_shared_prefix_is_served_from_the_cache_with_the_same_logits(engine_for):
    first, second = prompts(40, (7, 11))  # 40 shared tokens: two full blocks of 16
    cached = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=True)
    plain = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=False)
    for engine in (cached, plain):
        run(engine, first)
    tokens, logits, seq = run(cached, second)
    ref_tokens, ref_logits, ref_seq = run(plain, second)
    assert seq.num_cached_tokens == 2 * BLOCK and ref_seq.num_cached_tokens == 0
    assert tokens == ref_tokens
    # Not bitwise: the fp32 matmuls' summation order depends on how many rows a chunk holds,
    # so the prefix's K/V computed in the first prompt's 47-token prefill differ in the last
    # bits from those of the second prompt's 51-token one (a chunked prefill without the
    # cache differs the same way: measured 1-2e-6 on logits up to 6.4, i.e. 2-4 fp32 ulps).
    # 2e-5 is ten times that; a wrong block (another prefix's K/V) moves logits by O(1).
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-5)


def test_the_whole_prompt_cached_still_computes_its_last_token(engine_for):
    engine = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=True)
    prompt = sample_token_ids(get_fixture("olmoe"), 3 * BLOCK, seed=24)
    first, _, _ = run(engine, prompt)
    again, _, seq = run(engine, prompt)
    assert seq.num_cached_tokens == 2 * BLOCK, "the block holding the last token is recomputed"
    assert again == first


def test_the_cache_counts_lookups_and_hits(engine_for):
    engine = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=True, kv_tokens=32 * BLOCK)
    before = engine.stats()
    first, second = prompts(33, (5, 9))
    run(engine, first)
    run(engine, second)
    stats = engine.stats()
    assert stats["prefix_cache_queries"] - before["prefix_cache_queries"] == len(first) + len(second)
    assert stats["prefix_cache_hits"] - before["prefix_cache_hits"] == 2 * BLOCK
    assert stats["prompt_tokens_computed"] - before["prompt_tokens_computed"] == len(first) + len(second) - 2 * BLOCK


def test_eviction_under_a_small_pool_keeps_outputs_right(engine_for):
    # Six blocks: each request of three blocks evicts what the one before left cached.
    small = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=True, kv_tokens=6 * BLOCK, ctx_size=6 * BLOCK)
    plain = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=False)
    fixture = get_fixture("olmoe")
    many = [sample_token_ids(fixture, 2 * BLOCK + 5, seed=30 + i) for i in range(4)]
    for prompt in many:
        assert run(small, prompt)[0] == run(plain, prompt)[0]
        assert small.kv.blocks.num_cached <= small.kv.num_blocks
    tokens, _, seq = run(small, many[0])
    assert seq.num_cached_tokens == 0, "the first prompt's blocks were evicted for the others"
    assert tokens == run(plain, many[0])[0]
    tokens, _, seq = run(small, many[0])
    assert seq.num_cached_tokens == 2 * BLOCK and tokens == run(plain, many[0])[0]
    assert small.kv.usage == 0.0


def test_sequences_sharing_blocks_in_a_tight_pool_match_their_runs_alone(engine_for):
    # Two running sequences share a cached prefix; decodes preempt and readmit each other.
    engine = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=True, kv_tokens=5 * BLOCK,
                        ctx_size=5 * BLOCK, max_batch=2)
    plain = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=False)
    first, second = prompts(2 * BLOCK, (3, 6))
    params = SamplingParams(max_tokens=2 * BLOCK, temperature=0.0, ignore_eos=True)
    run(engine, first, GREEDY)  # caches the shared blocks
    seqs = [engine.add_request(p, params) for p in (first, second)]
    outputs = {s.seq_id: [] for s in seqs}
    while engine.has_work():
        for out in engine.step():
            outputs[out.seq_id].append(out.token_id)
    for seq, prompt in zip(seqs, (first, second)):
        assert outputs[seq.seq_id] == run(plain, prompt, params)[0]
    assert engine.kv.usage == 0.0


def test_an_abort_mid_prefill_leaks_nothing_and_caches_only_computed_blocks(engine_for):
    engine = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=True, max_batched_tokens=BLOCK,
                        kv_tokens=8 * BLOCK)
    prompt = sample_token_ids(get_fixture("olmoe"), 3 * BLOCK + 4, seed=40)
    cached_before = engine.kv.blocks.num_cached
    seq = engine.add_request(prompt, GREEDY)
    engine.step()  # one chunk of 16 tokens: one full block computed
    assert seq.num_computed == BLOCK
    engine.abort(seq.seq_id)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.has_work()
    assert engine.kv.blocks.num_cached == cached_before + 1, "only the computed block is cached"
    assert sum(engine.kv.blocks.ref_count) == 0
    plain = engine_for("olmoe", kv_block_size=BLOCK, prefix_cache=False, max_batched_tokens=BLOCK)
    tokens, _, again = run(engine, prompt)
    assert again.num_cached_tokens == BLOCK and tokens == run(plain, prompt)[0]


@pytest.mark.parametrize("arch", ["qwen35moe"])
def test_hybrid_models_keep_the_prefix_cache_off(engine_for, arch):
    engine = engine_for(arch, kv_block_size=BLOCK)
    assert not engine.kv.blocks.caching
    prompt = sample_token_ids(get_fixture(arch), 2 * BLOCK + 3, seed=50)
    first = run(engine, prompt)[0]
    again, _, seq = run(engine, prompt)
    assert seq.num_cached_tokens == 0 and again == first
