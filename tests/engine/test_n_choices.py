"""n choices on one prompt (Engine.add_group): the prompt is prefilled once and the other
choices fork from its KV (full blocks shared, the partial one copied; a hybrid model's
recurrent state copied); each choice draws the tokens a request of its own with its seed
draws."""

import pytest

from moestream.engine import SamplingParams
from tests.fixtures.models import get_fixture, sample_token_ids

SEEDS = (11, 12, 13)


def seeded(seed: int, max_tokens: int = 10) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True, logprobs=0)


def drain(engine, seqs, logprobs: dict | None = None) -> list[list[int]]:
    """Each sequence's tokens; their log-probabilities into `logprobs` by position."""
    outputs = {s.seq_id: [] for s in seqs}
    steps = 0
    while engine.has_work():
        for out in engine.step():
            outputs[out.seq_id].append(out.token_id)
            if logprobs is not None:
                logprobs.setdefault(out.seq_id, []).append(out.logprob.logprob)
        steps += 1
        assert steps < 500
    return [outputs[s.seq_id] for s in seqs]


def alone(engine, prompt, params, logprobs: list | None = None) -> list[int]:
    outs = list(engine.generate(prompt, params))
    if logprobs is not None:
        logprobs += [o.logprob.logprob for o in outs]
    return [o.token_id for o in outs]


@pytest.mark.parametrize("arch, n_prompt, prefix_cache", [
    ("olmoe", 21, True),  # a full block shared, the partial one copied
    ("olmoe", 32, False),  # only full blocks, no prefix cache: sharing needs none
    ("qwen35moe", 21, False),  # hybrid: the recurrent state is copied too
])
def test_choices_fork_from_one_prefill_and_match_requests_alone(engine_for, arch, n_prompt, prefix_cache):
    engine = engine_for(arch, kv_block_size=16, prefix_cache=prefix_cache)
    prompt = sample_token_ids(get_fixture(arch), n_prompt, seed=90)
    before = engine.prompt_tokens_computed
    seqs = engine.add_group(prompt, [seeded(s) for s in SEEDS])
    logprobs: dict = {}
    got = drain(engine, seqs, logprobs)
    assert engine.prompt_tokens_computed - before == n_prompt, "the prompt is prefilled once"
    for seq, seed, tokens in zip(seqs, SEEDS, got):
        ref: list[float] = []
        assert tokens == alone(engine, prompt, seeded(seed), ref)
        # The same draws are a weak check (a random model's attention can barely move them):
        # the log-probabilities must agree too, to what batching three rows instead of one
        # changes in fp32 sums.
        assert logprobs[seq.seq_id] == pytest.approx(ref, abs=1e-4)
    assert len(set(map(tuple, got))) == len(SEEDS), "different seeds draw different texts"
    assert engine.kv.usage == 0.0


def test_choices_match_what_separate_requests_in_one_batch_give(engine_for):
    engine = engine_for("olmoe", kv_block_size=16)
    prompt = sample_token_ids(get_fixture("olmoe"), 27, seed=91)
    before = engine.prompt_tokens_computed
    separate = drain(engine, [engine.add_request(prompt, seeded(s)) for s in SEEDS])
    assert engine.prompt_tokens_computed - before == len(SEEDS) * len(prompt)
    assert drain(engine, engine.add_group(prompt, [seeded(s) for s in SEEDS])) == separate


def test_a_fork_without_room_queues_and_still_draws_its_tokens(engine_for):
    engine = engine_for("olmoe", kv_block_size=16, max_batch=2)
    prompt = sample_token_ids(get_fixture("olmoe"), 21, seed=92)
    seqs = engine.add_group(prompt, [seeded(s) for s in SEEDS])
    got = drain(engine, seqs)
    assert got == [alone(engine, prompt, seeded(s)) for s in SEEDS]
    assert engine.kv.usage == 0.0


def test_forks_of_an_aborted_parent_prefill_on_their_own_and_aborts_leak_nothing(engine_for):
    engine = engine_for("olmoe", kv_block_size=16, max_batched_tokens=16)
    prompt = sample_token_ids(get_fixture("olmoe"), 40, seed=93)
    parent, *forks = engine.add_group(prompt, [seeded(s, 4) for s in SEEDS])
    engine.step()  # the parent's first chunk
    engine.abort(parent.seq_id)
    assert all(f.parent is None for f in forks)
    assert drain(engine, forks) == [alone(engine, prompt, seeded(s, 4)) for s in SEEDS[1:]]
    group = engine.add_group(prompt, [seeded(s, 4) for s in SEEDS])
    for _ in range(4):
        engine.step()
    for seq in group:
        engine.abort(seq.seq_id)
    assert engine.kv.usage == 0.0 and sum(engine.kv.blocks.ref_count) == 0 and not engine.has_work()
