"""Sampling filters against brute-force definitions."""

import math

import pytest
import torch

from moestream.engine.sampler import apply_penalties, filter_top_k_top_p, sample
from moestream.engine.sequence import SamplingParams, Sequence
from moestream.kernels.errors import MoestreamError


def brute_top_p(logits: list[float], top_p: float) -> set[int]:
    if top_p >= 1.0:  # by definition nothing is cut (summed floats may fall short of 1)
        return set(range(len(logits)))
    probs = torch.tensor(logits).softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_keeps_the_smallest_prefix_reaching_p(seed, top_p):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 3
    kept = set(torch.isfinite(filter_top_k_top_p(logits, 0, top_p)).nonzero().flatten().tolist())
    assert kept == brute_top_p(logits.tolist(), top_p)


@pytest.mark.parametrize("k", [1, 3, 49, 50, 80])
def test_top_k_keeps_k_largest(k):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(k))
    kept = torch.isfinite(filter_top_k_top_p(logits, k, 1.0)).nonzero().flatten().tolist()
    assert sorted(kept) == sorted(logits.argsort(descending=True)[: min(k, 50)].tolist())


def test_penalties_follow_the_openai_formula():
    seq = Sequence([1, 2], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    seq.output_ids = [3, 3, 4]
    logits = torch.zeros(6)
    out = apply_penalties(logits, seq).tolist()
    expected = [0, 0, 0, -(2 * 0.25 + 0.5), -(0.25 + 0.5), 0]
    assert all(math.isclose(a, b) for a, b in zip(out, expected))


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0),
                                 dict(top_p=1.5), dict(top_k=-2), dict(logprobs=21),
                                 dict(logit_bias=((3, 101.0),))])
def test_bad_sampling_values_are_user_errors(bad):
    with pytest.raises(MoestreamError):
        SamplingParams(**bad)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_adds_to_the_logits_before_the_choice(temperature):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)) * 3
    favourite, banned = 17, int(logits[1].argmax())
    seqs = [Sequence([1], SamplingParams(temperature=temperature, seed=s, logit_bias=((favourite, 100.0),)))
            for s in range(3)]
    seqs[1] = Sequence([1], SamplingParams(temperature=0, logit_bias=((banned, -100.0),)))
    chosen = [token for token, _ in sample(logits, seqs)]
    assert chosen[0] == chosen[2] == favourite
    shifted = logits[1].clone()
    shifted[banned] -= 100
    assert chosen[1] == int(shifted.argmax()) != banned
