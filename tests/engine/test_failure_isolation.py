"""One request's failure stays its own: sampling settings that would overflow are greedy,
and an exception in one sequence's sampling ends that sequence while the batch goes on."""

import pytest

from moestream.engine import SamplingParams
from moestream.engine import engine as engine_module
from tests.engine.test_generate import hf_greedy
from tests.fixtures.models import get_fixture, sample_token_ids

@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=6, temperature=1e-38, ignore_eos=True, seed=1),
    SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-46, ignore_eos=True, seed=1),
], ids=["temperature-1e-38", "top_p-1e-46"])
def test_tiny_temperature_or_top_p_is_greedy(engine_for, params):
    fixture = get_fixture("olmoe")
    prompt = sample_token_ids(fixture, 7, seed=3)
    got = [o.token_id for o in engine_for("olmoe").generate(prompt, params)]
    assert got == hf_greedy(fixture, prompt, params.max_tokens)


def test_a_failing_sequence_ends_alone_and_the_others_are_unchanged(engine_for, monkeypatch):
    engine = engine_for("olmoe", max_batch=4)
    fixture = get_fixture("olmoe")
    prompts = [sample_token_ids(fixture, n, seed=20 + n) for n in (5, 9, 4)]
    sampled = SamplingParams(max_tokens=10, temperature=0.9, seed=77, ignore_eos=True)
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), sampled, sampled]

    def run() -> dict[int, list]:
        seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        outputs = {s.seq_id: [] for s in seqs}
        while engine.has_work():
            for out in engine.step():
                outputs[out.seq_id].append(out)
        return [outputs[s.seq_id] for s in seqs]

    clean = run()
    victim_prompt = prompts[1]
    real_sample = engine_module.sample

    def sample_failing_for_the_victim(logits, seqs):
        seq = seqs[0]
        if seq.prompt_ids == victim_prompt and len(seq.output_ids) == 3:
            raise RuntimeError("injected sampling failure")
        return real_sample(logits, seqs)

    monkeypatch.setattr(engine_module, "sample", sample_failing_for_the_victim)
    failed = run()
    tokens = lambda outs: [o.token_id for o in outs]  # noqa: E731
    assert tokens(failed[0]) == tokens(clean[0]) and tokens(failed[2]) == tokens(clean[2])
    assert [o.finish_reason for o in failed[0]][-1] == "length"
    victim = failed[1]
    assert tokens(victim[:3]) == tokens(clean[1][:3])
    assert len(victim) == 4 and victim[-1].finished and victim[-1].finish_reason == "error"
    assert "injected sampling failure" in victim[-1].error
    assert engine.kv.usage == 0.0 and not engine.sequences, "the failed sequence kept its state"


def test_a_burst_is_admitted_up_to_the_free_batch_slots_plus_the_queue(engine_for):
    from moestream.engine import QueueFull

    engine = engine_for("olmoe", max_batch=3, max_waiting=2)
    prompt = sample_token_ids(get_fixture("olmoe"), 4, seed=9)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(prompt, params) for _ in range(5)]  # before any step runs
    with pytest.raises(QueueFull):
        engine.add_request(prompt, params)
    for seq in seqs:
        engine.abort(seq.seq_id)
    assert not engine.has_work()
