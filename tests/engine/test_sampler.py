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


class _DeviceLogits(torch.Tensor):
    """CPU logits that keep the rule a CUDA tensor imposes on sampling: a draw from them with
    a CPU generator raises (torch: "Expected a 'cuda' device type for generator"). Copying
    them to the host gives a plain tensor, as `.to("cpu")` of a CUDA tensor does."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.multinomial and isinstance(args[0], cls):
            raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            plain = args[0].as_subclass(torch.Tensor).clone()
            return getattr(plain, func.__name__)(*args[1:], **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def _draws(logits: torch.Tensor, seeds: list[int], steps: int) -> list[list[int]]:
    seqs = [Sequence([1], SamplingParams(temperature=1.0, seed=s)) for s in seeds]
    return [[token for token, _ in sample(logits, seqs)] for _ in range(steps)]


def test_sampling_copies_rows_to_the_host_before_drawing():
    """Every request at temperature 1.0 failed on CUDA: the seeded generator is a CPU one."""
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(0))
    on_device = logits.as_subclass(_DeviceLogits)
    with pytest.raises(RuntimeError, match="device type for generator"):
        torch.multinomial(on_device.softmax(-1)[0], 1, generator=torch.Generator())
    assert _draws(on_device, [3, 4], steps=5) == _draws(logits, [3, 4], steps=5)


def test_seeded_draws_are_torch_multinomial_on_host_rows():
    """The host path draws exactly what torch.multinomial draws from the softmax with the seed."""
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1)) * 2
    gen = torch.Generator().manual_seed(11)
    expected = [int(torch.multinomial(logits[0].softmax(-1), 1, generator=gen)) for _ in range(6)]
    assert [row[0] for row in _draws(logits, [11], steps=6)] == expected


def test_sampling_on_the_test_device_matches_the_host(device):
    """On a GPU machine: CUDA logits, seeded and greedy, give the host's tokens and logprobs."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    assert _draws(logits.to(device), [5, 6, 7], steps=4) == _draws(logits, [5, 6, 7], steps=4)
    greedy = Sequence([1], SamplingParams(temperature=0, logprobs=3))
    (token, lp), = sample(logits[:1].to(device), [greedy])
    assert token == int(logits[0].argmax())
    assert lp.logprob == pytest.approx(float(logits[0].log_softmax(-1).max()))
    assert [t for t, _ in lp.top] == logits[0].topk(3).indices.tolist()
