"""Decoding with the KV cache, batching, chunked prefill and preemption against
transformers' greedy decoding (full recomputation at every step)."""

import pytest
import torch

from moestream.engine import SamplingParams
from tests.fixtures.models import get_fixture, hf_model, sample_token_ids


def hf_greedy(fixture, prompt: list[int], n: int) -> list[int]:
    model = hf_model(fixture)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["olmoe", "qwen2moe", "qwen3moe", "mixtral"])
def test_greedy_generation_matches_transformers(engine_for, arch):
    fixture = get_fixture(arch)
    prompt = sample_token_ids(fixture, 11, seed=5)
    ours = [o.token_id for o in engine_for(arch).generate(prompt, GREEDY)]
    assert ours == hf_greedy(fixture, prompt, GREEDY.max_tokens)


def run_all(engine, prompts, params):
    seqs = [engine.add_request(p, params) for p in prompts]
    outputs = {s.seq_id: [] for s in seqs}
    steps = 0
    while engine.has_work():
        for out in engine.step():
            outputs[out.seq_id].append(out.token_id)
        steps += 1
        assert steps < 1000
    return [outputs[s.seq_id] for s in seqs]


@pytest.mark.parametrize("options", [
    dict(max_batch=3, max_batched_tokens=16),  # chunked prefill, requests wait for a place
    dict(max_batch=2, ctx_size=48),  # one 48-token KV pool for two: decodes preempt and recompute
], ids=["chunked", "preempting"])
def test_continuous_batching_matches_requests_alone(engine_for, options):
    fixture = get_fixture("olmoe")
    engine = engine_for("olmoe", **options)
    prompts = [sample_token_ids(fixture, n, seed=10 + n) for n in (3, 20, 9, 33, 14)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    results = run_all(engine, prompts, params)
    for prompt, got in zip(prompts, results):
        assert got == hf_greedy(fixture, prompt, params.max_tokens)
    assert engine.kv.usage == 0.0, "finished sequences must free their KV blocks"


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine_for):
    engine = engine_for("olmoe")
    prompt = sample_token_ids(get_fixture("olmoe"), 6, seed=7)

    def draw(seed):
        params = SamplingParams(max_tokens=16, temperature=1.5, seed=seed, ignore_eos=True)
        return [o.token_id for o in engine.generate(prompt, params)]

    assert draw(123) == draw(123)
    assert draw(123) != draw(124)


def test_abort_frees_kv(engine_for):
    engine = engine_for("olmoe")
    seq = engine.add_request(sample_token_ids(get_fixture("olmoe"), 30, seed=8), GREEDY)
    engine.step()
    assert engine.kv.usage > 0
    engine.abort(seq.seq_id)
    assert engine.kv.usage == 0.0 and not engine.has_work()
