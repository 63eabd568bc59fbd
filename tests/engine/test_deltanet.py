"""The Gated DeltaNet blocks against transformers' reference implementations of the same
rule (token-by-token recurrence and its depthwise convolution), with a carried-in state."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as ref

from moestream.engine.deltanet import causal_conv, causal_conv_step, delta_rule_chunked, delta_rule_step_


def _inputs(n: int, heads: int = 4, dk: int = 16, dv: int = 8, batch: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, n, heads, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, n, heads, dk, generator=gen), dim=-1)
    v = torch.randn(batch, n, heads, dv, generator=gen)
    g = -torch.rand(batch, n, heads, generator=gen)  # log decay, <= 0
    beta = torch.rand(batch, n, heads, generator=gen)
    state = torch.randn(batch, heads, dk, dv, generator=gen)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("n", [1, 5, 64, 150])  # within one chunk, exactly one, across three
def test_chunked_matches_the_token_recurrence(n):
    q, k, v, g, beta, state = _inputs(n)
    want, want_state = ref.torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                            output_final_state=True)
    scale = q.shape[-1] ** -0.5  # the reference scales q inside; ours takes it scaled
    got, got_state = delta_rule_chunked(q[0] * scale, k[0], v[0], g[0], beta[0], state[0].clone())
    torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_state, want_state[0], rtol=1e-4, atol=1e-4)


def test_batched_step_matches_the_token_recurrence():
    q, k, v, g, beta, state = _inputs(1, batch=3, seed=1)
    want, want_state = ref.torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                            output_final_state=True)
    got_state = state.clone()
    got = delta_rule_step_(q[:, 0] * q.shape[-1] ** -0.5, k[:, 0], v[:, 0], g[:, 0], beta[:, 0], got_state)
    torch.testing.assert_close(got, want[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-5)


def test_convolution_in_pieces_matches_one_pass():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 24, 10, generator=gen)  # [batch, channels, time], the reference's layout
    weight = torch.randn(24, 4, generator=gen)
    want = ref.causal_conv1d_fn(x, weight, activation="silu")[0].t()  # [time, channels]
    window = torch.zeros(3, 24)
    first, window = causal_conv(x[0, :, :6].t(), window, weight)
    steps = []
    for t in range(6, 10):
        y, windows = causal_conv_step(x[0, :, t][None], window[None], weight)
        window = windows[0]
        steps.append(y[0])
    torch.testing.assert_close(torch.cat([first, torch.stack(steps)]), want, rtol=1e-5, atol=1e-5)
